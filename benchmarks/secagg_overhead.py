"""Secure-aggregation protocol cost in memory (no network): prints JSON.

10 banks, d = 138k (the bank app's MLP), threshold 7; one bank drops after the keys
are shared. Times are for the whole federation on this machine, one process; bytes
are what a bank sends per round (masked vector + keys + shares + unmask answer).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from flower_ext.secagg import BankSession, SecAggParams, ServerRound, dequantize_sum


def main(n: int = 10, dim: int = 138_000, threshold: int = 7) -> dict:
    params = SecAggParams(threshold=threshold)
    rng = np.random.default_rng(0)
    vectors = {i: rng.normal(0, 0.01, dim) / n for i in range(1, n + 1)}
    t0 = time.perf_counter()
    banks = {i: BankSession(i, 1, params) for i in vectors}
    server = ServerRound(1, params)
    for i, b in banks.items():
        server.advertised(i, *b.advertise())
    sent = {i: (b.share_keys(dict(server.roster)), b.self_seed_digest()) for i, b in banks.items()}
    share_bytes = sum(len(c) for c in sent[1][0].values())
    for i, cts in server.route_shares(sent).items():
        banks[i].receive_shares(cts)
    t1 = time.perf_counter()
    masked = {i: b.masked_input(vectors[i])[0] for i, b in banks.items() if i != n}
    t2 = time.perf_counter()
    for i, y in masked.items():
        server.add_masked(i, y)
    survivors, dropped = server.unmask_request()
    answers = {i: banks[i].unmask_shares(survivors, dropped) for i in survivors}
    total = server.unmask(answers)
    t3 = time.perf_counter()
    got = dequantize_sum(total, len(survivors), params)
    want = sum(vectors[i] for i in survivors)
    answer_bytes = sum(len(s) for d in answers[1] for s in d.values())
    return {
        "banks": n,
        "dim": dim,
        "threshold": threshold,
        "dropped": len(dropped),
        "keys_and_shares_s": round(t1 - t0, 3),
        "masking_s_all_banks": round(t2 - t1, 3),
        "masking_s_per_bank": round((t2 - t1) / (n - 1), 3),
        "unmask_s_server": round(t3 - t2, 3),
        "max_abs_error": float(np.max(np.abs(got - want))),
        "error_bound": len(survivors) * params.quantum,
        "uplink_bytes_per_bank": 4 * dim + 64 + share_bytes + 32 + answer_bytes,
        "plaintext_float32_bytes": 4 * dim,
    }


if __name__ == "__main__":
    json.dump(main(*map(int, sys.argv[1:])), sys.stdout, indent=1)
    print()
