"""Secure aggregation on Flower's deployment runtime: TLS SuperLink, 4 authenticated SuperNodes.

The bank app with ``secagg = true`` and signed keys (each SuperNode has an Ed25519
identity and the four banks' public keys in its node config), hence also the
consistency check. One bank is killed
(SIGKILL) as soon as the keys are shared, so it vanishes while the others mask:
the SuperLink answers for it once its heartbeats stop, the server rebuilds its
mask key from the survivors' shares, and the round completes with the other three
(t = 3 of 4). Helpers and the process-cleanup fixture come from test_deployment.py.
"""

from __future__ import annotations

import json
import signal

import pytest
from conftest import APP_DIR
from test_deployment import (  # noqa: F401  (deployment is a fixture)
    BASE_CONFIG,
    audit_events,
    deployment,
    finish,
    has_event,
    speaks_tls,
    wait_for,
)

from flower_ext.audit.signing import Signer
from flower_ext.runcheck import verify_run


@pytest.mark.slow
def test_secagg_over_tls_survives_a_bank_killed_mid_protocol(deployment, tmp_path):  # noqa: F811
    dep = deployment
    assert speaks_tls(dep.port, dep.ca_cert).startswith("TLS")
    names = [f"bank-{i}" for i in range(4)]
    signers = {name: Signer.generate() for name in names}
    for name, signer in signers.items():
        signer.write(tmp_path / f"{name}-identity.pem")
    trusted = ",".join(s.public_hex for s in signers.values())
    ids = {name: dep.register(name) for name in names}
    for i, name in enumerate(names):
        dep.start_supernode(
            name,
            {
                "bank-index": i,
                "secagg-identity-key": str(tmp_path / f"{name}-identity.pem"),
                "secagg-trusted-keys": trusted,
            },
        )
    run_dir = tmp_path / "runs" / "secagg"
    run = dep.start_run(
        APP_DIR,
        {
            **BASE_CONFIG,
            "num-banks": 4,
            "num-server-rounds": 1,
            "min-banks": 3,
            "round-timeout": 90.0,
            "secagg": True,
            "output-dir": str(run_dir.parent),
            "run-name": run_dir.name,
        },
    )
    log = dep.log_file("flwr-run")
    shared = has_event(run_dir, "secagg_step", round=1, stage="share-keys")
    wait_for("the keys shared", shared, 180, run, log)
    dep.stop("bank-3", sig=signal.SIGKILL)  # a crash while the others mask
    finish(dep, run, timeout=240)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    train = metrics["rounds"][0]["train"]
    assert train["secagg-threshold"] == 3
    events = audit_events(run_dir)
    advertised = [e for e in events if e["event"] == "secagg_step" and e["stage"] == "advertise"]
    assert advertised[0]["signed"] == 4  # every bank signed its keys; all checked them
    check = [e for e in events if e["event"] == "secagg_step" and e["stage"] == "consistency"]
    assert len(check) == 1 and ids["bank-3"] not in check[0]["signed"]
    assert len(check[0]["signed"]) == 3  # the survivors signed the survivor list
    dropouts = [e for e in events if e["event"] == "secagg_dropout"]
    assert [e["node_id"] for e in dropouts] == [ids["bank-3"]]
    assert dropouts[0]["stage"] in ("masked-input", "unmask")
    if dropouts[0]["stage"] == "masked-input":  # its pairwise masks were removed
        assert train["secagg-survivors"] == 3 and train["secagg-dropped"] == 1
        assert any(e["event"] == "secagg_recovered" for e in events)
    assert any(e["event"] == "round_aggregated" and e["round"] == 1 for e in events)
    assert metrics["secure_aggregation"]["rounds_aggregated"] == 1
    assert verify_run(run_dir).ok
