"""Download (where possible) and prepare a dataset into the cache, then print a summary.

    python data/prepare.py ml-1m
    python data/prepare.py synthetic --num-items 1000000 --num-users 250000 --min-item-count 0
    python data/prepare.py --path my.csv --format csv --sep ';' --user-col uid --item-col iid --time-col ts

Raw MovieLens files go to data/raw/<name>/, prepared arrays to data/prepared/<name>-<hash>/.
The options mirror config.data (see cprec/data/dataset.py default_data_config).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cprec.data import dataset, download  # noqa: E402
from cprec.errors import exit_on_user_error  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    defaults = dataset.default_data_config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", choices=dataset.NAMES, help="dataset (default: csv when --path is given)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing file")
    p.add_argument("--raw-dir", default=str(dataset.REPO_ROOT / "data" / "raw"), help="where downloads go")
    for key, value in defaults.items():
        if key == "name":
            continue
        flag = "--" + key.replace("_", "-")
        p.add_argument(flag, dest=key, type=type(value), default=value, help=f"config.data.{key} (default {value!r})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = dataset.default_data_config()
    for key in cfg:
        if key != "name":
            cfg[key] = getattr(args, key)
    cfg.name = args.name or ("recbole" if args.format == "recbole" else "csv" if args.path else "")
    if not cfg.name:
        _parser().error("give a dataset name, or --path FILE")
    with exit_on_user_error():
        if cfg.name in download.ARCHIVES and not cfg.path and not args.no_download:
            raw_dir = pathlib.Path(args.raw_dir)
            if raw_dir.resolve() != (dataset.REPO_ROOT / "data" / "raw").resolve():
                cfg.path = str(download.download(cfg.name, raw_dir))
            elif not any(p.is_file() for p in [dataset.REPO_ROOT / p for p in dataset.DEFAULT_PATHS[cfg.name]]
                         + dataset.data_path_files(cfg.name)):  # nor a copy on $CPREC_DATA_PATH
                download.download(cfg.name, raw_dir)
        data = dataset.load_dataset(cfg)
    m = data.meta
    print(
        f"{m['name']}: {m['num_users']:,} users, {m['num_items'] - 1:,} items (+1 padding), "
        f"{m['num_events']:,} events, {m['num_train_windows']:,} training windows of {m['max_len'] + 1}\n"
        f"split: {m.get('split', 'leave_one_out')} ({m.get('num_val_users', m['num_users']):,} validation users, "
        f"{m.get('num_test_users', m['num_users']):,} test users)\n"
        f"source: {m['source']}\ncache:  {m['cache_dir']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
