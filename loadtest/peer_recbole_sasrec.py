"""Peer figures: RecBole 1.2.1's SASRec on MovieLens-100K under genrec's evaluation protocol.

For comparison only. RecBole is NOT a dependency of genrec: this script imports it, so it
runs only inside a separate "peer" virtual environment, never in the project's own.

Protocol (genrec's): ML-100K as shipped in the recbole 1.2.1 wheel
(`recbole/dataset_example/ml-100k/`), implicit feedback (every rating is an interaction),
per-user order by timestamp with ties kept in file order (stable). Leave-one-out: the last
interaction is the test item, the second last the validation item, the rest train. Full
ranking over all items, with every item of the user's earlier history (train + validation
items, i.e. everything before the test item) excluded. HR@10, NDCG@10, HR@30, NDCG@30 over
all users (NDCG with one relevant item = 1 / log2(rank + 2) on a hit, rank 0-based).

RecBole's own full-sort evaluation of sequential models does not exclude history items, so
its printed test figures are not comparable; they are printed for reference only. This
script trains with RecBole, loads the best checkpoint and rescores the test set itself.

Tie ordering. RecBole orders by the `timestamp:float` column after min-max normalising it
(`normalize_all: True`) and casting it to float32; that cast merges distinct timestamps that
lie a second or two apart, and RecBole's sorts are stable (numpy kind="stable"), so such
merged pairs fall back to file order, which can disagree with the true time order. On the
shipped file (75,772 of the 100,000 interactions share their timestamp with another of the
same user; 415 users' test timestamp ties their previous one) the float32 merge changes the
test item of 4 users, the validation item of 5 and the test input sequence of 37. To
follow the protocol exactly the script therefore hands RecBole a copy of the shipped .inter
with the same rows stably pre-sorted by the raw timestamp (so every tie RecBole sees is
already in protocol order);
`--shipped-order` uses the shipped file as is instead. Either way the script checks, for
every user, RecBole's test item and input sequence against the protocol order computed
from the raw file, and reports the mismatches.

Set-up (once; keep it outside the repository):

    python3 -m venv /tmp/recbole-peer/venv
    /tmp/recbole-peer/venv/bin/pip install recbole==1.2.1 torch==2.13.0 \
        "numpy<1.24" "pandas<2.1" "scipy<1.12" "setuptools<81"

(numpy<1.24 keeps `np.float`/`np.bool`, which recbole 1.2.1's metrics still use; pandas<2.1
and scipy<1.12 are the last releases built against numpy 1.23; setuptools<81 keeps
`pkg_resources`, which ray 2.6.3 needs when recbole.quick_start is imported - this script
does not import it, so that pin only matters for RecBole's own `run_recbole`.)

Run (CPU, 2 threads; writes logs and checkpoints under --out, not in the repository):

    /tmp/recbole-peer/venv/bin/python loadtest/peer_recbole_sasrec.py \
        --out /tmp/recbole-peer/run --epochs 200 --seed 2020 --threads 2 \
        [--max-train-minutes 75]

`--check-only` builds RecBole's splits, runs the ordering checks and stops before training.
`--max-train-minutes M` stops training at the first epoch end after M minutes (the best
checkpoint so far is kept and scored; the JSON says so). `--rescore CHECKPOINT` skips
training and scores a saved checkpoint (same data, same checks). The last line printed is
a JSON object with the results. `--per-user FILE` also writes each user's history-excluded
HR/NDCG in genrec's per-user score file (see model_store/scores.py), for
`genrec eval BUNDLE --peer FILE` (a paired bootstrap of served − SASRec on the same users).

Speed note: importing `recbole.model.sequential_recommender` runs
`torch.autograd.set_detect_anomaly(True)` (module level of recbole's sine.py), which makes
every backward pass check each activation for NaN; the script switches it off again, which
changes no result, only the time. Even so an epoch of SASRec here is about
48 batches x a few seconds on 2 CPU threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch

CUTOFFS = (10, 30)
PER_USER_FORMAT = "genrec-per-user/1"  # model_store.scores.PER_USER_FORMAT
DATASET = "ml-100k"
# RecBole ignores `data_path` for a dataset named "ml-100k" (it always reads the copy in its
# own dataset_example/), so the pre-sorted copy goes under another name.
PRESORTED = "ml-100k-tsorted"


class TimeCap(Exception):
    """Raised from RecBole's per-epoch callback to stop training at the time cap."""


def numpy_aliases() -> None:
    """recbole 1.2.1 uses aliases that numpy 1.24 removed; a no-op with numpy<1.24 pinned."""
    for alias, kind in (("float", float), ("int", int), ("bool", bool)):
        if alias not in np.__dict__:
            setattr(np, alias, kind)


def shipped_inter_path() -> str:
    import recbole

    return os.path.join(
        os.path.dirname(recbole.__file__), "dataset_example", DATASET, f"{DATASET}.inter"
    )


def read_inter(path: str) -> tuple[str, list[list[str]]]:
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n")
        rows = [line.rstrip("\n").split("\t") for line in fh if line.strip()]
    return header, rows


def protocol_order(rows: list[list[str]]) -> dict[str, list[int]]:
    """Per user (raw token), row numbers in time order; ties keep file order."""
    stamps = np.array([float(r[3]) for r in rows], dtype=np.float64)
    users = np.array([r[0] for r in rows])
    order = np.argsort(stamps, kind="stable")
    order = order[np.argsort(users[order], kind="stable")]
    per_user: dict[str, list[int]] = defaultdict(list)
    for j in order:
        per_user[users[j]].append(int(j))
    return per_user


def tie_stats(rows: list[list[str]], per_user: dict[str, list[int]]) -> dict[str, int]:
    stamps = [float(r[3]) for r in rows]
    shared = 0
    test_tied = 0
    for seq in per_user.values():
        ts = [stamps[j] for j in seq]
        for k, t in enumerate(ts):
            if (k > 0 and ts[k - 1] == t) or (k + 1 < len(ts) and ts[k + 1] == t):
                shared += 1
        if len(ts) > 1 and ts[-1] == ts[-2]:
            test_tied += 1
    return {
        "interactions_sharing_timestamp_within_user": shared,
        "users_whose_test_timestamp_ties_the_previous": test_tied,
    }


def write_presorted_copy(header: str, rows: list[list[str]], data_root: str) -> str:
    """Same rows as the shipped file, stably sorted by raw timestamp."""
    stamps = np.array([float(r[3]) for r in rows], dtype=np.float64)
    order = np.argsort(stamps, kind="stable")
    folder = os.path.join(data_root, PRESORTED)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{PRESORTED}.inter"), "w", encoding="utf-8") as fh:
        fh.write(header + "\n")
        for j in order:
            fh.write("\t".join(rows[j]) + "\n")
    return data_root


def build_config(args: argparse.Namespace, data_root: str, dataset_name: str):
    from recbole.config import Config

    config_dict = {
        "data_path": data_root,
        "checkpoint_dir": os.path.join(args.out, "saved"),
        "use_gpu": False,
        "seed": args.seed,
        "reproducibility": True,
        "show_progress": False,
        "state": "INFO",
        # data: implicit feedback, every rating is an interaction; the settings of RecBole's
        # properties/dataset/ml-100k.yaml that differ from sample.yaml, so the renamed
        # pre-sorted copy is processed exactly like "ml-100k"
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "normalize_all": True,
        "user_inter_num_interval": None,
        "item_inter_num_interval": None,
        "MAX_ITEM_LIST_LENGTH": 50,
        "eval_args": {
            "split": {"LS": "valid_and_test"},
            "order": "TO",
            "mode": "full",
            "group_by": "user",
        },
        # SASRec defaults (recbole/properties/model/SASRec.yaml), spelled out
        "n_layers": 2,
        "n_heads": 2,
        "hidden_size": 64,
        "inner_size": 256,
        "hidden_dropout_prob": 0.5,
        "attn_dropout_prob": 0.5,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "initializer_range": 0.02,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        # training
        "learner": "adam",
        "learning_rate": 0.001,
        "train_batch_size": args.train_batch_size,
        "epochs": args.epochs,
        "eval_step": 1,
        "stopping_step": args.stopping_step,
        "eval_batch_size": 4096,
        "metrics": ["Hit", "NDCG"],
        "topk": list(CUTOFFS),
        "valid_metric": "NDCG@10",
        "valid_metric_bigger": True,
    }
    return Config(model="SASRec", dataset=dataset_name, config_dict=config_dict)


def check_split(dataset, test_ds, valid_ds, rows, per_user, max_len: int) -> dict[str, int]:
    """Compare RecBole's test/valid rows with the protocol order from the raw file."""
    uid_field, iid_field = dataset.uid_field, dataset.iid_field
    seq_field = iid_field + dataset.config["LIST_SUFFIX"]
    len_field = dataset.config["ITEM_LIST_LENGTH_FIELD"]
    out = {
        "users": len(per_user),
        "test_rows": len(test_ds.inter_feat),
        "valid_rows": len(valid_ds.inter_feat),
        "test_item_mismatch": 0,
        "test_sequence_mismatch": 0,
        "valid_item_mismatch": 0,
    }
    tuids = test_ds.inter_feat[uid_field].numpy()
    out["test_users_distinct"] = len(set(tuids.tolist()))
    for k, uid in enumerate(tuids):
        raw_user = dataset.id2token(uid_field, int(uid))
        seq = [rows[j][1] for j in per_user[raw_user]]
        target = dataset.id2token(iid_field, int(test_ds.inter_feat[iid_field][k]))
        n = int(test_ds.inter_feat[len_field][k])
        given = [dataset.id2token(iid_field, int(x)) for x in test_ds.inter_feat[seq_field][k][:n]]
        if target != seq[-1]:
            out["test_item_mismatch"] += 1
        if given != seq[:-1][-max_len:]:
            out["test_sequence_mismatch"] += 1
    for k, uid in enumerate(valid_ds.inter_feat[uid_field].numpy()):
        raw_user = dataset.id2token(uid_field, int(uid))
        target = dataset.id2token(iid_field, int(valid_ds.inter_feat[iid_field][k]))
        if target != rows[per_user[raw_user][-2]][1]:
            out["valid_item_mismatch"] += 1
    return out


def per_user_columns(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Each user's HR@k and NDCG@k (ranks 0-based); their means are the reported figures."""
    out: dict[str, np.ndarray] = {}
    for k in CUTOFFS:
        hit = ranks < k
        out[f"HR@{k}"] = hit.astype(np.float64)
        out[f"NDCG@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    return out


def summarise(ranks: np.ndarray) -> dict[str, float]:
    return {name: float(np.mean(values)) for name, values in per_user_columns(ranks).items()}


def write_per_user(path: str, users: list[str], ranks: np.ndarray, meta: dict) -> None:
    """genrec's per-user score file (format in model_store/scores.py's docstring), so
    `genrec eval --peer PATH` can pair these users with genrec's. Written here by hand:
    genrec is not installed in the peer's environment."""
    doc = {
        "format": PER_USER_FORMAT,
        "name": f"RecBole {meta['recbole']} SASRec",
        "user_id": users,
        "rows": {
            "SASRec": {m: v.tolist() for m, v in per_user_columns(ranks).items()},
        },
        "meta": meta,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)


@torch.no_grad()
def rescore(model, dataset, test_ds, rows, per_user) -> tuple[np.ndarray, np.ndarray, int, list]:
    """Ranks of each user's test item over all items, history excluded and not excluded,
    the score ties after exclusion, and the raw user id of each rank."""
    uid_field, iid_field = dataset.uid_field, dataset.iid_field
    model.eval()
    inter = test_ds.inter_feat
    scores = model.full_sort_predict(inter).float()  # [users, item_num], column 0 = [PAD]
    scores[:, 0] = -math.inf
    targets = inter[iid_field].long()
    excluded, plain, users = [], [], []
    ties = 0
    for k, uid in enumerate(inter[uid_field].numpy()):
        row = scores[k].clone()
        target_score = row[targets[k]].item()
        plain.append(int((row > target_score).sum()))
        raw_user = dataset.id2token(uid_field, int(uid))
        users.append(str(raw_user))
        history = [rows[j][1] for j in per_user[raw_user][:-1]]
        hist_ids = torch.as_tensor(dataset.token2id(iid_field, history), dtype=torch.long)
        assert int(targets[k]) not in set(hist_ids.tolist()), "test item repeats history"
        row[hist_ids] = -math.inf
        excluded.append(int((row > target_score).sum()))
        ties += int((row == target_score).sum()) - 1
    return np.array(excluded), np.array(plain), ties, users


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default="/tmp/recbole-peer/run", help="logs, checkpoints, data copy"
    )
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--stopping-step", type=int, default=10)
    parser.add_argument("--train-batch-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--shipped-order",
        action="store_true",
        help="feed RecBole the shipped .inter as is (float32 timestamp ties follow file order)",
    )
    parser.add_argument("--check-only", action="store_true", help="check the splits, do not train")
    parser.add_argument(
        "--max-train-minutes",
        type=float,
        default=None,
        help="stop training at the first epoch end after this many minutes",
    )
    parser.add_argument("--rescore", default=None, help="score this checkpoint, do not train")
    parser.add_argument(
        "--per-user",
        default=None,
        help="also write the history-excluded per-user scores here (genrec's per-user score "
        "file, for `genrec eval --peer`)",
    )
    args = parser.parse_args()
    if args.per_user:
        args.per_user = os.path.abspath(args.per_user)  # before the chdir below

    started = time.time()
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    os.chdir(args.out)  # RecBole writes ./log and ./log_tensorboard relative to the cwd
    torch.set_num_threads(args.threads)
    numpy_aliases()

    import recbole
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    torch.autograd.set_detect_anomaly(False)  # see "Speed note" above

    header, rows = read_inter(shipped_inter_path())
    per_user = protocol_order(rows)
    ties = tie_stats(rows, per_user)
    if args.shipped_order:
        dataset_name = DATASET
        data_root = os.path.dirname(os.path.dirname(shipped_inter_path())) + os.sep
    else:
        dataset_name = PRESORTED
        data_root = write_presorted_copy(header, rows, os.path.join(args.out, "data")) + os.sep

    config = build_config(args, data_root, dataset_name)
    expected = os.path.join(data_root, dataset_name)
    if os.path.realpath(config["data_path"]) != os.path.realpath(expected):
        raise SystemExit(f"RecBole reads {config['data_path']}, expected {expected}")
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    torch.set_num_threads(args.threads)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    split_check = check_split(
        dataset,
        test_data._dataset,
        valid_data._dataset,
        rows,
        per_user,
        config["MAX_ITEM_LIST_LENGTH"],
    )
    print("split check:", json.dumps(split_check), "| ties:", json.dumps(ties), flush=True)
    result = {
        "peer": f"RecBole {recbole.__version__} SASRec",
        "dataset": f"{DATASET} (recbole wheel dataset_example)",
        "input_order": "shipped" if args.shipped_order else "presorted-by-raw-timestamp",
        "recbole_data_path": config["data_path"],
        "split_check": split_check,
        "ties": ties,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
    }
    if args.check_only:
        result["wall_s"] = round(time.time() - started, 1)
        print(json.dumps(result))
        return 0

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = SASRec(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model)
    epochs_run = []
    inner_train_epoch = trainer._train_epoch

    def counted_train_epoch(train_data, epoch_idx, *a, **kw):
        epochs_run.append(epoch_idx)
        return inner_train_epoch(train_data, epoch_idx, *a, **kw)

    trainer._train_epoch = counted_train_epoch
    train_started = time.time()

    def time_cap(epoch_idx, valid_score):
        if args.max_train_minutes is not None and (
            time.time() - train_started > 60.0 * args.max_train_minutes
        ):
            raise TimeCap(epoch_idx)

    if args.rescore:
        checkpoint_file = os.path.abspath(args.rescore)
        stopped_by = "not trained here (--rescore)"
    else:
        try:
            trainer.fit(
                train_data, valid_data, saved=True, show_progress=False, callback_fn=time_cap
            )
            stopped_by = "early stopping" if len(epochs_run) < args.epochs else "max epochs"
        except TimeCap:
            stopped_by = f"time cap ({args.max_train_minutes} min)"
        checkpoint_file = trainer.saved_model_file
    train_s = time.time() - train_started

    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    recbole_test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    excluded, plain, score_ties, users = rescore(model, dataset, test_data._dataset, rows, per_user)

    result.update(
        {
            "history_excluded": summarise(excluded),
            "history_not_excluded_own_rescore": summarise(plain),
            "recbole_test_not_excluded": {k: float(v) for k, v in recbole_test.items()},
            "target_score_ties_after_exclusion": score_ties,
            "epochs_trained": len(epochs_run),
            "stopped_by": stopped_by,
            "best_epoch": int(checkpoint["epoch"]),
            "best_valid_ndcg10_not_excluded": float(checkpoint["best_valid_score"]),
            "max_epochs": args.epochs,
            "stopping_step": args.stopping_step,
            "checkpoint": checkpoint_file,
            "train_s": round(train_s, 1),
            "wall_s": round(time.time() - started, 1),
        }
    )
    if args.per_user:
        meta = {"recbole": recbole.__version__, "seed": args.seed, "checkpoint": checkpoint_file}
        write_per_user(args.per_user, users, excluded, meta)
        result["per_user_file"] = os.path.abspath(args.per_user)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
