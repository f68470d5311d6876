"""Run (or reuse) everything the layer comparison needs for any datasets, then write their answers.

For each dataset (a built-in name or the user's own folder) x base: extract every stage tap (plus the ImageNet
logits of the reference base, which measure the dataset's distance from ImageNet), sweep the heads on every tap;
then the controls: the same base with random-init weights, and logistic regression on raw pixels. From the saved
heads :mod:`featurecache.answer` computes the answer and :mod:`featurecache.report` writes
``reports/compare/<dataset>/`` (and ``reports/compare/`` when several datasets are given). Every step is cached, so
a re-run only does what is missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from featurecache import store
from featurecache.advice import explain
from featurecache.answer import Answer, Comparison, LabelReader, Scope, compute_answer, result_of_record
from featurecache.baselines import pixel_baseline
from featurecache.bases import WEIGHTS_NONE, get_base_spec
from featurecache.config import Paths, default_paths
from featurecache.datasets import DatasetSource, parse_dataset
from featurecache.errors import FeaturecacheError, check_seed
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from featurecache.layer_scores import DEFAULT_SHORTLIST_SCORE, shortlist_layers
from featurecache.leaderboard import write_leaderboard
from featurecache.metrics import paired_difference
from featurecache.report import REFERENCE_BASE, imagenet_distance, write_dataset_report, write_index
from featurecache.train import TrainOptions, train_heads

log = logging.getLogger(__name__)

COMPARE_HEADS = ("logreg", "linear_svm", "rbf_svm", "multilayer")  # fast on CPU; --heads adds mlp/knn
FINETUNABLE_HEADS = ("mlp", "logreg", "linear_svm")  # heads the fine-tune stage can rebuild as torch layers


@dataclass(frozen=True)
class CompareOptions:
    """What the comparison runs besides the pretrained heads."""

    heads: Sequence[str] = COMPARE_HEADS
    controls: bool = True  # random-init base + raw-pixel baseline
    finetune: bool = False  # fine-tune from the recommended head and add it to the answer
    finetune_epochs: int = 5
    shortlist: int | None = None  # train heads only on the K layers a training-free score ranks best
    shortlist_score: str = DEFAULT_SHORTLIST_SCORE
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    seed: int = 0

    def check(self) -> None:
        """Refuse what the fine-tuning stage would refuse before minutes of extraction and training, not after
        them: the same ``FinetuneOptions.check``, on the options that stage will get."""
        check_seed(self.seed)
        self.train.check()  # --n-jobs 0, say: refused before the extraction, not after it
        if self.finetune:
            try:
                self.finetune_options(head="logreg", layer="").check()
            except FeaturecacheError as e:  # the stage's own flag is --epochs; here it is --finetune-epochs
                raise FeaturecacheError(str(e).replace("--epochs", "--finetune-epochs")) from None

    def finetune_options(self, *, head: str, layer: str) -> Any:
        """The fine-tuning stage's options (``featurecache.finetune.FinetuneOptions``) for ``head`` at ``layer``."""
        from featurecache.finetune import FinetuneOptions

        return FinetuneOptions(head=head, layer=layer, max_epochs=self.finetune_epochs, seed=self.seed,
                               progress=self.train.progress)  # fmt: skip


def run_comparison(
    *,
    datasets: Sequence[DatasetSource | str],
    bases: Sequence[str],
    options: CompareOptions | None = None,
    paths: Paths | None = None,
    command: str = "",
) -> list[Answer]:
    """Extract, train, answer and report for ``datasets`` x ``bases``; returns one answer per dataset."""
    options = options or CompareOptions()
    options.check()
    paths = paths or default_paths()
    sources = [parse_dataset(d, paths) if isinstance(d, str) else d for d in datasets]
    answers = []
    for source in sources:
        t0 = time.perf_counter()
        answer = compare_dataset(source, bases, options=options, paths=paths)
        write_dataset_report(answer, paths, command=command)
        # The dataset's leaderboard and best.json hold every saved head; left as an earlier train-heads wrote them,
        # they missed this run's heads (another base's) and named a best the answer beside them contradicted.
        write_leaderboard(source.name, paths)
        answer.seconds = round(time.perf_counter() - t0, 1)
        log.info("%s done in %.0fs", source.name, answer.seconds)
        answers.append(answer)
    if len(answers) > 1:
        write_index(answers, paths, command=command)
    return answers


def compare_dataset(source: DatasetSource, bases: Sequence[str], *, options: CompareOptions, paths: Paths) -> Answer:
    """Everything for one dataset: caches, heads, controls, the answer (and fine-tuning when asked)."""
    root = source.root(paths.raw, paths.external)
    trained: dict[str, frozenset[str]] = {}  # base tag -> the layers its heads were trained on here
    copies: dict[str, int] = {}  # val/test images that are copies of train images (the same for every base)
    tops: dict[str, str] = {}  # base tag -> its top stage tap, which a --shortlist may leave untrained
    for base in bases:
        tag, layers, copies, tops[tag] = _pretrained(source.name, root, base, options=options, paths=paths)
        trained[tag] = frozenset(layers)
        if options.controls:
            _random_init(source.name, root, base, options=options, paths=paths)
    if REFERENCE_BASE not in bases:  # the ImageNet classifier's logits measure the distance from ImageNet
        extract(
            ExtractRequest(root, base=REFERENCE_BASE, layers="logits", dataset=source.name),
            options=options.extract,
            paths=paths,
        )
    tags = list(trained)
    if options.controls:
        pixel_baseline(source.name, tags[0], paths, seed=options.seed)
    scope = Scope(heads=frozenset(options.heads), layers=trained, tops=tops)
    answer = compute_answer(source.name, tags, paths, distance=imagenet_distance(source.name, paths), scope=scope)
    answer.copies_of_train = copies
    if options.finetune:
        answer.finetune = finetune_recommended(answer, options=options, paths=paths)
    return explain(answer)


def _pretrained(
    dataset: str, root: Any, base: str, *, options: CompareOptions, paths: Paths
) -> tuple[str, list[str], dict[str, int], str]:
    """Extract ``base``'s stage taps and train the heads on them (or on the shortlist); returns its tag, the layers
    trained, by split the val/test images extract found to be copies of train images, and its top stage tap."""
    spec = get_base_spec(base)
    layers = "all-stages,logits" if base == REFERENCE_BASE and spec.has_imagenet_classifier else "all-stages"
    results = extract(
        ExtractRequest(root, base=base, layers=layers, dataset=dataset), options=options.extract, paths=paths
    )
    tag = results[0].path.parent.name
    taps = store.read_metadata(results[0].path)["taps"]
    stages = [k for k in results[0].taps if not store.is_imagenet_logits(taps[k])]  # the logits are no stage
    top = max(stages, key=lambda k: (taps[k]["relative_depth"], k))  # as answer.layer_curve orders its layers
    if options.shortlist is not None:
        t0 = time.perf_counter()
        stages = shortlist_layers(dataset, tag, options.shortlist, options.shortlist_score, paths, layers=stages)
        log.info("%s x %s: shortlist by %s in %.1fs: %s", dataset, tag, options.shortlist_score,
                 time.perf_counter() - t0, ", ".join(stages))  # fmt: skip
    train_heads(dataset=dataset, base_tag=tag, layers=stages, heads=options.heads, options=options.train, paths=paths)
    return tag, stages, {r.split: r.copies_of_train for r in results if r.copies_of_train}, top


def _random_init(dataset: str, root: Any, base: str, *, options: CompareOptions, paths: Paths) -> None:
    results = extract(
        ExtractRequest(root, base=base, layers="all-stages", dataset=dataset, weights=WEIGHTS_NONE),
        options=options.extract,
        paths=paths,
    )
    train_heads(
        dataset=dataset, base_tag=results[0].path.parent.name, heads=options.heads, options=options.train, paths=paths
    )


def finetune_recommended(answer: Answer, *, options: CompareOptions, paths: Paths) -> Comparison:
    """Fine-tune from the recommended head (or, when its kind cannot be rebuilt in torch, from the best logreg at
    the same layer) and measure the paired gain over the recommendation on the same test images."""
    from featurecache.finetune import finetune

    rec = answer.recommended
    head = rec.head if rec.head in FINETUNABLE_HEADS else "logreg"
    if head != rec.head:
        train_heads(dataset=answer.dataset, base_tag=rec.base, layers=[rec.layer], heads=[head], options=options.train,
                    paths=paths)  # fmt: skip
    ft_options = options.finetune_options(head=head, layer=rec.layer)
    result = finetune(dataset=answer.dataset, base_tag=rec.base, options=ft_options, paths=paths)
    tuned = result_of_record(result.record, LabelReader(), paths)
    gain = paired_difference(tuned.test_correct, rec.test_correct)
    return Comparison(result=tuned, reference=rec, gain=gain, route=f"fine-tuned from {rec.layer} / {head}")
