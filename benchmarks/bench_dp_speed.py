"""DP-SGD epoch time vs plain training on the bank model, for every Opacus grad-sample mode.

Plain = the app's own path (``flower_ext.training.train_local``: shuffled DataLoader,
SGD + momentum). DP = ``flower_ext.privacy.make_private`` + ``train_private_epochs``
on the same model, data and batch size, for grad_sample_mode in hooks / functorch /
ew / ghost, with and without the fused flat clipping, plus the untouched Opacus
default (``PrivacyEngine.make_private`` with its DPDataLoader, "hooks"). Each
variant is first checked for correctness: one step at noise 0 on a fixed batch
must equal a reference written here (per-sample gradients one sample at a time,
clipped, summed). Variants are timed interleaved, best of ``--repeats``.

    python benchmarks/bench_dp_speed.py [--repeats 7] [--epochs 5]

Prints JSON and writes benchmarks/results/dp_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "apps" / "bank_risk")]

warnings.filterwarnings("ignore")


def reference_step(model, x, y, clip, expected_batch):
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(x[i : i + 1]).reshape(-1), y[i : i + 1]
        )
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        for t, g in zip(total, grads, strict=True):
            t += min(1.0, clip / (norm + 1e-6)) * g
    return [t / expected_batch for t in total]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rows-per-bank", type=int, default=2000)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/dp_speed.json"))
    args = parser.parse_args()

    from opacus import PrivacyEngine

    from flower_ext.data import DataSource, load_bank
    from flower_ext.model import build_model
    from flower_ext.privacy import (
        DPSGDConfig,
        PrivacyLedger,
        make_private,
        train_private_epochs,
    )
    from flower_ext.training import make_loader, train_epochs

    torch.set_num_threads(1)
    source = DataSource.from_config({"rows-per-bank": args.rows_per_bank})
    bank = load_bank(source, 0)
    x, y = bank.x_train, bank.y_train
    batch, lr, clip = 64, 0.05, 1.0

    def fresh_model():
        torch.manual_seed(0)
        model = build_model(bank.num_features, "mlp", "32,16")
        std = x.std(axis=0)
        std[std < 1e-8] = 1.0
        model.set_standardisation(x.mean(axis=0), std)
        return model

    variants = {"plain": None, "opacus-default-hooks": "opacus"}
    for mode in ("hooks", "functorch", "ew", "ghost"):
        variants[f"{mode}"] = (mode, False)
        if mode != "ghost":
            variants[f"{mode}+fused"] = (mode, True)

    def setup(spec):
        model = fresh_model()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        loader = make_loader(x, y, batch, 0)
        if spec is None:
            return lambda: train_epochs(model, loader, opt, 1), None
        if spec == "opacus":
            engine = PrivacyEngine(accountant="rdp")
            module, dp_opt, dp_loader = engine.make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=clip,
            )
            return lambda: train_epochs(module, dp_loader, dp_opt, 1), None
        mode, fused = spec
        cfg = DPSGDConfig(
            noise_multiplier=1.0,
            max_grad_norm=clip,
            grad_sample_mode=mode,
            fused_clipping=fused,
            rounds=10**6,
        )
        private = make_private(
            module=model, optimizer=opt, data_loader=loader, config=cfg, ledger=PrivacyLedger()
        )
        return lambda: train_private_epochs(private, epochs=1), private

    # Correctness: one step at noise 0 on a fixed batch vs the reference.
    xb, yb = torch.tensor(x[:batch]), torch.tensor(y[:batch]).float()
    correctness: dict[str, float] = {}
    for name, spec in variants.items():
        if spec is None or spec == "opacus":
            continue
        mode, fused = spec
        model = fresh_model()
        start = [p.detach().clone() for p in model.parameters()]
        steps_per_epoch = len(make_loader(x, y, batch, 0))
        expected = int(len(x) / steps_per_epoch)
        ref = reference_step(model, xb, yb, clip, expected)
        cfg = DPSGDConfig(
            noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode, fused_clipping=fused
        )
        private = make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=make_loader(x, y, batch, 0),
            config=cfg,
            ledger=PrivacyLedger(),
        )
        private.data_loader = [(xb, yb)]
        train_private_epochs(private, epochs=1)
        err = max(
            float((p0 - p.detach() - g).abs().max())
            for p0, p, g in zip(start, model.parameters(), ref, strict=True)
        )
        correctness[name] = err

    runners = {name: setup(spec)[0] for name, spec in variants.items()}
    for run in runners.values():
        run()  # warm-up
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(args.repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(args.epochs):
                run()
            best[name] = min(best[name], (time.perf_counter() - start) / args.epochs)
    plain = best["plain"]
    table = {
        name: {
            "epoch_ms": 1e3 * t,
            "x_plain": t / plain,
            "max_abs_error_vs_reference": correctness.get(name),
            "correct": correctness.get(name, 0.0) < 1e-5,
        }
        for name, t in best.items()
    }
    dp_names = [n for n in table if n not in ("plain", "opacus-default-hooks")]
    fastest = min((n for n in dp_names if table[n]["correct"]), key=lambda n: table[n]["epoch_ms"])
    result = {
        "benchmark": "dp_speed",
        "model": "CreditRiskModel mlp 32,16",
        "train_rows": len(x),
        "batch_size": batch,
        "steps_per_epoch": len(make_loader(x, y, batch, 0)),
        "repeats": args.repeats,
        "epochs_per_timing": args.epochs,
        "torch_threads": 1,
        "machine": platform.processor() or platform.machine(),
        "variants": table,
        "fastest_correct": fastest,
        "fastest_x_plain": table[fastest]["x_plain"],
        "target_x_plain": 2.0,
    }
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
