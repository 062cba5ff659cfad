"""The peer: RecBole 1.2.1's SASRec on MovieLens-100K under cprec's protocol, timed per epoch.

Runs in its own virtual environment, no part of requirements.txt (RecBole 1.2.1 needs numpy<2):

  python -m venv ../recbole-venv
  ../recbole-venv/bin/pip install "setuptools<70" torch==2.13.0 "recbole==1.2.1" "numpy<2" "pandas<2.2" "scipy<1.14"
  ../recbole-venv/bin/python experiments/peers/recbole_sasrec.py --data_path ../shared/data --out bench_results/peer-recbole-sasrec-ml100k.json

The protocol is cprec's `experiments/sasrec.py:ml100k`: users and items with at least 5
interactions, leave-one-out by time (the last item of each user is the test target, the one before
it the validation target), full ranking over all items, L = 50, cross-entropy over all items,
batch 256, validation every epoch, early stopping on validation MRR@10 after 10 epochs without a
better one (RecBole's `stopping_step`), and test with the best-validation model. Everything else is
RecBole's SASRec default (2 blocks, 2 heads, d = 64, inner 256, dropout 0.5, GELU, Adam 1e-3).

Prints one line per epoch and writes a JSON with each epoch's training and validation seconds, the
best epoch, the wall time from start (data preparation included) to the end of that epoch's
validation, and the test metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

# RecBole 1.2.1 reloads its own best checkpoint with torch.load, which torch >= 2.6 refuses by default.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
import torch  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, get_trainer, init_seed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_path", required=True, help="directory holding ml-100k/ml-100k.inter (RecBole atomic files)")
    p.add_argument("--out", required=True, help="where to write the JSON of the run")
    p.add_argument("--seed", type=int, default=2020, help="RecBole's default seed")
    p.add_argument("--epochs", type=int, default=300)
    args = p.parse_args()
    data_path, out_path = os.path.abspath(args.data_path), os.path.abspath(args.out)
    os.chdir(tempfile.mkdtemp(prefix="recbole-"))  # RecBole writes log_tensorboard/ into the working directory
    start = time.perf_counter()
    config = Config(model="SASRec", dataset="ml-100k", config_dict={
        "data_path": data_path, "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[5,inf)", "item_inter_num_interval": "[5,inf)",
        "MAX_ITEM_LIST_LENGTH": 50, "loss_type": "CE", "train_neg_sample_args": None,
        "train_batch_size": 256, "eval_batch_size": 256, "epochs": args.epochs, "eval_step": 1, "stopping_step": 10,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": [5, 10, 20], "valid_metric": "MRR@10",
        "seed": args.seed, "reproducibility": True, "use_gpu": False, "show_progress": False,
        "checkpoint_dir": "saved"})
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    prepared_s = time.perf_counter() - start

    epochs: list[dict] = []
    train_epoch, valid_epoch = trainer._train_epoch, trainer._valid_epoch

    def timed_train(*a, **kw):
        t0 = time.perf_counter()
        out = train_epoch(*a, **kw)
        epochs.append({"epoch": len(epochs), "train_s": time.perf_counter() - t0})
        return out

    def timed_valid(*a, **kw):
        t0 = time.perf_counter()
        score, result = valid_epoch(*a, **kw)
        row = epochs[-1]
        row.update(valid_s=time.perf_counter() - t0, elapsed_s=time.perf_counter() - start,
                   valid={k: float(v) for k, v in result.items()})
        print(f"epoch {row['epoch']}: train {row['train_s']:.1f} s, valid {row['valid_s']:.1f} s, "
              f"valid mrr@10 {score:.4f}, elapsed {row['elapsed_s']:.0f} s", flush=True)
        return score, result

    trainer._train_epoch, trainer._valid_epoch = timed_train, timed_valid
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    best = max(epochs, key=lambda r: r["valid"]["mrr@10"])  # the first of equals, as RecBole keeps it
    out = {"peer": "RecBole 1.2.1 SASRec", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "seed": args.seed,
           "items": int(dataset.item_num) - 1, "users": int(dataset.user_num) - 1,
           "prepare_s": prepared_s, "epochs": epochs, "best_epoch": best["epoch"],
           "wall_s_to_best": best["elapsed_s"], "wall_s_total": time.perf_counter() - start,
           "median_train_epoch_s": sorted(r["train_s"] for r in epochs)[len(epochs) // 2],
           "test": {k: float(v) for k, v in test.items()},
           "command": "python experiments/peers/recbole_sasrec.py --data_path DATA --out OUT"}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("best_epoch", "wall_s_to_best", "median_train_epoch_s", "test")}), flush=True)


if __name__ == "__main__":
    main()
