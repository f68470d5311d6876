"""featurecache finetune: rebuild base + tap + best head, unfreeze the top block(s), train carefully, test once."""

from __future__ import annotations

import argparse
import sys

from pipelines.common import comma_list, run_main, seed


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("featurecache finetune", description=__doc__, add_help=add_help)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--base", default="efficientnet_lite0", help="base cache folder (as in train-heads --bases)")
    p.add_argument(
        "--head", default="mlp", help="stage-2 head to start from: mlp, or logreg (folded to a linear layer)"
    )
    p.add_argument("--layer", help="start from the head at this layer (default: the best on val)")
    p.add_argument("--unfreeze", type=comma_list, default=[], help="module names of the base to train, e.g. _blocks.15")
    p.add_argument("--unfreeze-last", type=int, default=1, help="or: the last K blocks before the tap (default 1)")
    p.add_argument("--train-bn", action="store_true", help="let BatchNorm layers update their statistics")
    p.add_argument("--lr-head", type=float, default=1e-4)
    p.add_argument("--lr-base", type=float, default=1e-5)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, help="batches per epoch (smoke runs)")
    p.add_argument("--augment", default="light", choices=["light", "standard", "none"],
                   help="light: crop+rotation+colour (safe for digits); standard adds horizontal flips")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(args: argparse.Namespace) -> int:
    # Imported here, not at the top: featurecache.finetune imports torch, and the console script imports every
    # entry point to build its help, so `featurecache --help` / `--version` stay fast.
    from featurecache.config import default_paths
    from featurecache.finetune import FinetuneOptions, finetune
    from featurecache.leaderboard import write_leaderboard

    options = FinetuneOptions(
        head=args.head,
        layer=args.layer,
        unfreeze=tuple(args.unfreeze),
        unfreeze_last=args.unfreeze_last,
        train_bn=args.train_bn,
        lr_head=args.lr_head,
        lr_base=args.lr_base,
        optimizer=args.optimizer,
        max_epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        augment=args.augment,
        device=args.device,
        workers=args.workers,
        seed=args.seed,
        progress=args.progress,
    )
    result = finetune(dataset=args.dataset, base_tag=args.base, options=options)
    s = result.sidecar
    write_leaderboard(args.dataset)
    unfrozen = ", ".join(s["params"]["unfrozen"]) or "none"
    started = s["started_from"].rsplit("/", 1)[-1]
    print(f"fine-tuned {s['layer']} + {started} (unfrozen: {unfrozen}){' [resumed]' if result.resumed else ''}")
    print(f"rebuilt model reproduced the frozen head on {100 * s['rebuilt_agreement']:.1f}% of val")
    per_epoch = ", ".join(f"{100 * h['val_accuracy']:.1f}%" for h in s.get("history", []))
    chosen = f"epoch {s['best_epoch']}" if s["best_epoch"] else "the frozen head: no epoch beat it"
    print(f"val per epoch: {per_epoch or 'none run'}")
    print(f"val {100 * s['selection_val_accuracy']:.1f}% ({chosen}); test "
          f"{100 * s['test']['accuracy']:.1f}% vs frozen {100 * s['frozen_test_accuracy']:.1f}%: gain "
          f"{s['gain_over_frozen_points']:+.1f} points, 95% CI [{s['gain_ci95_points'][0]:+.1f}, "
          f"{s['gain_ci95_points'][1]:+.1f}]")  # fmt: skip
    print(f"verdict: {result.verdict}")
    print(f"saved {result.model_dir}; leaderboard updated: {default_paths().leaderboard_file(args.dataset, '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
