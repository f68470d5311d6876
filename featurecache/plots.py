"""The accuracy-versus-layer figure: small multiples, one row per dataset, one column per pretrained base.

Each panel reads at a glance: the layers by name on the x axis (relative depth under each name), the pretrained
curve (test accuracy of the head chosen on val at each layer) with its 95% Wilson band, the controls in grey
(random-init base dashed, raw pixels dotted), chance as a thin black line, the tie set ringed in green, heads
significantly better on test than the recommendation as red triangles, and the recommendation starred. What belongs to
the dataset rather than to a base (its distance from ImageNet, measured with one reference classifier) heads its row.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from featurecache.advice import SIMILAR_CONFIDENCE
from featurecache.answer import Answer, HeadResult
from featurecache.weights import PIXELS_TAG, is_control, is_random_tag, random_tag

PRETRAINED_COLOUR = "#1f77b4"
CONTROL_COLOUR = "0.55"
TIE_COLOUR = "#2ca02c"
MULTI_COLOUR = "#9467bd"
BETTER_COLOUR = "#d62728"
PANEL_SIZE = (5.6, 4.3)  # inches per panel; layer names under the axis need the height
DPI = 110
# The HTML reports' text column (report.CSS): a figure drawn wider is shrunk to it, and its text with it (three
# panels a row showed 7-point tick labels at 7 pixels). Drawn at most this wide, the figure is shown at its own size.
PAGE_WIDTH_PX = 1250
TICK_FONT = 8  # points: 12 pixels on the page at DPI
LABEL_FONT = 9


def columns_of(answers: Sequence[Answer]) -> list[str]:
    """The figure's columns: the pretrained bases, in the order first met (the controls are drawn in their panels)."""
    return list(dict.fromkeys(b for a in answers for b in a.curves if not is_control(b)))


def panels(answers: Sequence[Answer]) -> list[tuple[Answer, str]]:
    """The panels drawn, row by row: a dataset's row holds a panel for each base it was measured with."""
    return [(a, base) for a in answers for base in columns_of(answers) if base in a.curves]


def plot_answers(answers: Sequence[Answer], out: Path, *, reference: str) -> None:
    """Write the small-multiples PNG for ``answers`` to ``out``: a row per answer, a column per pretrained base.
    ``reference``: the base whose ImageNet classifier measured each dataset's distance from ImageNet."""
    import matplotlib.pyplot as plt

    fig = figure(answers, reference=reference)
    out.parent.mkdir(parents=True, exist_ok=True)
    # "tight" grows the canvas to what is drawn: the two-column legend of a single panel is wider than the panel.
    fig.savefig(out, dpi=DPI, bbox_inches="tight", pad_inches=0.08)
    plt.close(fig)


def figure(answers: Sequence[Answer], *, reference: str):  # noqa: ANN201 (a matplotlib Figure)
    """The figure :func:`plot_answers` writes, at most ``PAGE_WIDTH_PX`` wide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases, cells = columns_of(answers), panels(answers)
    width = min(PANEL_SIZE[0], (PAGE_WIDTH_PX / DPI - 0.3) / len(bases))  # 0.3 in: the tight crop's padding
    rotation = 35 if width > 4.5 else 60  # narrower panels (3 bases and more): steeper names, or they overlap
    scale = _shared_scale(cells)
    legend_columns = {1: 2, 2: 3}.get(len(bases), 4)  # what fits the figure's width at fontsize 9
    fig = plt.figure(figsize=(width * len(bases), PANEL_SIZE[1] * len(answers) + 0.3), layout="constrained")
    for row, answer in zip(fig.subfigures(len(answers), 1, squeeze=False)[:, 0], answers, strict=True):
        row.suptitle(_row_title(answer, reference, chars=int(12 * width * len(bases))), fontsize=LABEL_FONT + 1)
        for ax, base in zip(row.subplots(1, len(bases), squeeze=False)[0], bases, strict=True):
            if base in answer.curves:
                _panel(ax, answer, base, scale, rotation=rotation)
            else:
                ax.set_visible(False)
    fig.legend(handles=_legend_handles(answers), loc="outside lower center", ncol=legend_columns, frameon=False,
               fontsize=LABEL_FONT)  # fmt: skip
    return fig


def _row_title(answer: Answer, reference: str, *, chars: int) -> str:
    """The dataset, and its distance from ImageNet: the 2x2 rule's "similar to ImageNet" axis, a property of the data
    measured once with ``reference``'s classifier, whichever bases the row's panels show (in each panel's title it
    read as that base's confidence)."""
    if answer.distance is None:
        return answer.dataset
    confidence = answer.distance["confidence"]
    lines = [f"{answer.dataset}: similarity to ImageNet {confidence:.2f}, one measure for every base (similar from "
             f"{SIMILAR_CONFIDENCE:.2f})",
             f"= the mean confidence of {reference}'s ImageNet classifier on its images"]  # fmt: skip
    return "\n".join(textwrap.fill(line, chars) for line in lines)


def _panel(ax, answer: Answer, base: str, scale: tuple[float, float], *, rotation: int) -> None:  # noqa: ANN001
    curve = answer.curves[base]
    x = list(range(len(curve)))
    position = {r.layer: i for i, r in enumerate(curve)}
    ax.fill_between(x, [100 * r.test_interval[0] for r in curve], [100 * r.test_interval[1] for r in curve],
                    color=PRETRAINED_COLOUR, alpha=0.15, lw=0)  # fmt: skip
    ax.plot(x, [100 * r.test_accuracy for r in curve], "-o", color=PRETRAINED_COLOUR, ms=4, lw=1.8)
    _controls(ax, answer, base, position)
    _chance(ax, 100 * answer.transfer.chance, scale)
    tied = _tied_points(answer, base)
    ax.scatter([position[r.layer] for r in tied], [100 * r.test_accuracy for r in tied], s=110, facecolors="none",
               edgecolors=TIE_COLOUR, linewidths=1.8, zorder=3)  # fmt: skip
    better = _better_points(answer, base)  # any head at a layer, on the curve or not: val missed them
    ax.scatter([position[r.layer] for r in better], [100 * r.test_accuracy for r in better], marker="^", s=70,
               color=BETTER_COLOUR, edgecolors="k", linewidths=0.6, zorder=5)  # fmt: skip
    for m in _multi_tap_heads(answer, base):
        ax.axhline(100 * m.test_accuracy, color=MULTI_COLOUR, ls="-.", lw=1.3)
    ticks, labels = x, [f"{r.layer}\n{r.depth:.2f}" for r in curve]
    star = star_of(answer, base)
    if star is not None:
        x_star = len(curve) if star.multi_tap else position[star.layer]  # a multi-tap head: a place of its own
        if star.multi_tap:
            ticks, labels = [*x, x_star], [*labels, f"{star.n_taps} taps\n(multilayer)"]
        # Not clipped by the axes: at 100% its upper half was cut off by the frame.
        ax.plot([x_star], [100 * star.test_accuracy], marker="*", ms=16, color="gold", mec="k", zorder=5, clip_on=False)
    ax.set_xticks(ticks, labels, rotation=rotation, ha="right", rotation_mode="anchor", fontsize=TICK_FONT)
    ax.tick_params(axis="y", labelsize=TICK_FONT + 1)
    ax.set_xlabel("layer, relative depth under its name (evenly spaced)", fontsize=LABEL_FONT)
    ax.set_ylabel("test accuracy (%)", fontsize=LABEL_FONT)
    ax.set_ylim(*scale)
    ax.set_title(f"{answer.dataset} — {base}", fontsize=LABEL_FONT + 1)
    ax.grid(alpha=0.3)


def _tied_points(answer: Answer, base: str) -> list[HeadResult]:
    """The points of a panel's curve ringed as tied: the curve's own head at a layer tied with the recommendation."""
    return [r for r in answer.curves[base]
            if any(t.base == base and t.layer == r.layer and t.head == r.head for t in answer.ties)]  # fmt: skip


def _better_points(answer: Answer, base: str) -> list[HeadResult]:
    """The heads of a panel's base significantly better on test than the recommendation (single layers)."""
    layers = {r.layer for r in answer.curves[base]}
    return [r for r in answer.better_on_test if r.base == base and not r.multi_tap and r.layer in layers]


def _multi_tap_heads(answer: Answer, base: str) -> list[HeadResult]:
    return [r for r in answer.heads.get(base, []) if r.multi_tap]


def star_of(answer: Answer, base: str) -> HeadResult | None:
    """The starred point of a panel: the recommendation, on its own base's panel (the one selection rule)."""
    rec = answer.recommended
    return rec if rec.base == base else None


def _control_points(answer: Answer, base: str) -> list[HeadResult]:
    return answer.curves.get(random_tag(base), []) + answer.curves.get(PIXELS_TAG, [])[:1]


def _shared_scale(cells: Sequence[tuple[Answer, str]]) -> tuple[float, float]:
    """One y range (%) for every panel, so a 2-point wiggle in one does not look like a 20-point swing in another:
    every point drawn (the curve's band, the controls, the multilayer heads) fits, from 5 points under the lowest
    (down to a chance line within 10 points of it) to just above the highest (102 where a point is at 100%, drawn
    whole rather than cut by the frame)."""
    lows, highs = [], []
    for answer, base in cells:
        curve = answer.curves[base]
        drawn = [*_control_points(answer, base), *_multi_tap_heads(answer, base), *_better_points(answer, base)]
        points = [100 * r.test_accuracy for r in drawn]
        bottom = min([100 * r.test_interval[0] for r in curve] + points) - 5
        chance = 100 * answer.transfer.chance
        lows.append(min(bottom, chance - 3) if chance >= bottom - 10 else bottom)
        highs.append(max([100 * r.test_interval[1] for r in curve] + points + [chance]))
    return max(0.0, min(lows)), min(102.0, max(highs) + 3)


def _chance_drawn(cells: Sequence[tuple[Answer, str]], scale: tuple[float, float]) -> bool:
    return any(100 * answer.transfer.chance >= scale[0] for answer, _ in cells)


def _chance(ax, chance: float, scale: tuple[float, float]) -> None:  # noqa: ANN001
    """Chance as a line where the shared range reaches it; far below it, a note, so the curves keep the height."""
    if chance >= scale[0]:
        ax.axhline(chance, color="k", lw=0.8)
    else:
        ax.annotate(f"chance {chance:.1f}% (below)", xy=(0.01, 0.02), xycoords="axes fraction", fontsize=8)


def _controls(ax, answer: Answer, base: str, position: dict[str, int]) -> None:  # noqa: ANN001
    random_curve: list[HeadResult] = answer.curves.get(random_tag(base), [])
    shared = [r for r in random_curve if r.layer in position]
    if shared:
        # Above the curve and the tie rings: a control level with the pretrained point must still show.
        ax.plot([position[r.layer] for r in shared], [100 * r.test_accuracy for r in shared], "--x",
                color=CONTROL_COLOUR, ms=7, mew=1.6, lw=1.2, zorder=4)  # fmt: skip
    pixels = answer.curves.get(PIXELS_TAG)
    if pixels:
        ax.axhline(100 * pixels[0].test_accuracy, color=CONTROL_COLOUR, ls=":", lw=1.5, zorder=4)


def _legend_handles(answers: Sequence[Answer]) -> list:
    """The legend of what the panels draw: a control, chance, the multilayer head or ties only where some panel
    draws one."""
    from matplotlib.lines import Line2D

    cells = panels(answers)
    drawn = {
        "chance": _chance_drawn(cells, _shared_scale(cells)),
        "random": any(is_random_tag(b) for a in answers for b in a.curves),
        "pixels": any(PIXELS_TAG in a.curves for a in answers),
        "multi": any(_multi_tap_heads(a, base) for a, base in cells),
        "ties": any(_tied_points(a, base) for a, base in cells),
        "better": any(_better_points(a, base) for a, base in cells),
    }
    styles = [
        (None, {"color": PRETRAINED_COLOUR, "marker": "o", "ms": 4,
                "label": "pretrained (val-selected head), 95% band"}),
        ("random", {"color": CONTROL_COLOUR, "ls": "--", "marker": "x", "ms": 7, "mew": 1.6,
                    "label": "random-init control"}),
        ("pixels", {"color": CONTROL_COLOUR, "ls": ":", "lw": 1.5, "label": "raw pixels (logreg)"}),
        ("chance", {"color": "k", "lw": 0.8, "label": "chance (largest class)"}),
        ("multi", {"color": MULTI_COLOUR, "ls": "-.", "lw": 1.3, "label": "multilayer head (its taps at once)"}),
        ("ties", {"ls": "", "marker": "o", "mfc": "none", "mec": TIE_COLOUR, "ms": 10, "mew": 1.8,
                  "label": "tied with the recommendation"}),
        ("better", {"ls": "", "marker": "^", "color": BETTER_COLOUR, "mec": "k", "ms": 8,
                    "label": "significantly better on test (val missed it)"}),
        (None, {"ls": "", "marker": "*", "color": "gold", "mec": "k", "ms": 14,
                "label": "recommended (chosen on val)"}),
    ]  # fmt: skip
    return [Line2D([], [], **style) for what, style in styles if what is None or drawn[what]]
