"""Evaluations of bounded caches on plain Python values (no command line here).

``perplexity`` (streaming PPL, methods x budgets), ``passkey``, ``ruler`` (prompts in
``ruler_prompts``) and ``longbench`` (scored by ``metrics``) each supply their prompts, scores and
rows; ``harness`` is the loop they share and ``report`` the tables and files they leave behind.
The ``lacache eval`` commands in :mod:`lacache.cli` are thin wrappers around them.
"""
