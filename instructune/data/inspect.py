"""`instructune data inspect`: look at instruction data before spending GPU hours on it.

Counts per format and source, duplicates, prompt/response token lengths for a tokenizer, how many
examples model_max_length would truncate, and a few rendered examples with the learned span marked;
with an output folder, a JSON summary and a histogram PNG.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from instructune.data.cache import Encoding, conversations, prepare
from instructune.data.formats import from_row
from instructune.data.sources import DatasetSpec
from instructune.data.templates import render_segments
from instructune.files import atomic_file, png_figure

TARGET_START, TARGET_END = "⟦", "⟧"  # marks the learned span in the shown examples


@dataclass
class LengthStats:
    mean: float
    median: float
    p90: int
    p99: int
    max: int

    @classmethod
    def of(cls, values) -> "LengthStats":
        ordered = np.sort(np.asarray(values))
        def at(q: float) -> int:
            return int(ordered[min(len(ordered) - 1, int(q * len(ordered)))])
        return cls(round(float(ordered.mean()), 1), float(np.median(ordered)), at(0.9), at(0.99), int(ordered[-1]))


def inspect(specs: list[DatasetSpec], tokenizer, template: str, max_length: int, seed: int = 42, show: int = 3,
            cache_dir=None, workers: int | None = None) -> tuple[dict, list[str], dict]:
    """(summary, rendered examples with the target span marked, lengths {prompt, response, total}), read from the
    tokenisation cache a training run with these settings uses (prepared here if it is not there yet): lengths are
    before truncation, so what model_max_length would cut is seen."""
    prepared = prepare(specs, tokenizer, Encoding(template, max_length), seed, cache_dir=cache_dir, workers=workers)
    columns = prepared.rows.data
    total, response = (columns.column(name).to_numpy() for name in ("full_length", "target_tokens"))
    prompt = total - response
    stats = prepared.stats
    summary = {
        "records": stats.records,
        "sources": stats.sources,
        "formats": prepared.formats,
        "duplicates_removed": {"exact": stats.duplicates.get("exact", 0),
                               "normalised": stats.duplicates.get("normalised", 0)},
        "skipped_empty": stats.skipped,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "template": template,
        "model_max_length": max_length,
        "over_max_length": int((total > max_length).sum()),
        "tokens": {name: asdict(LengthStats.of(values)) for name, values in
                   (("prompt", prompt), ("response", response), ("total", total))},
        "cache": str(prepared.folder),
    }
    if "rejected_length" in columns.column_names:
        summary["preference_pairs"] = int((columns.column("rejected_length").to_numpy() > 0).sum())
    rows = conversations(prepared.folder)
    shown = [shown_example(from_row(rows[i]["conversation"]), template, tokenizer) for i in range(min(show, len(rows)))]
    return summary, shown, {"prompt": prompt, "response": response, "total": total}


def shown_example(conversation, template: str, tokenizer) -> str:
    """The rendered conversation, its targets marked; a pair's rejected reply after it, marked too."""
    (segments,) = render_segments([conversation], template, tokenizer)
    text = mark_targets(segments)
    if conversation.rejected is not None:
        rejected = render_segments([conversation.with_rejected_reply()], template, tokenizer)[0][-1:]
        text += f"\n  (rejected instead:) {mark_targets(rejected)}"
    return text


def mark_targets(segments: list[tuple[str, bool]]) -> str:
    return "".join(f"{TARGET_START}{text}{TARGET_END}" if target else text for text, target in segments)


def write_report(summary: dict, lengths: dict, output_dir: Path) -> None:
    with atomic_file(output_dir / "summary.json") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    # a few very long examples would squash the plot: show up to the max length's neighbourhood or the p99
    upper = max(1.25 * summary["model_max_length"], summary["tokens"]["total"]["p99"])
    with png_figure(output_dir / "lengths.png", size=(8, 4)) as (_, axes):
        for name in ("prompt", "response", "total"):
            axes.hist(np.minimum(lengths[name], upper), bins=60, range=(0, upper), alpha=0.5, label=name)
        axes.axvline(summary["model_max_length"], color="black", linestyle="--", label="model_max_length")
        axes.set_xlabel(f"tokens (longer ones counted at {upper:.0f})")
        axes.set_ylabel("examples")
        axes.set_title(f"{summary['records']} examples, {summary['over_max_length']} over model_max_length")
        axes.legend()


def format_summary(summary: dict) -> str:
    lines = [f"{summary['records']} records: " + ", ".join(f"{n} from {s}" for s, n in summary["sources"].items()),
             "formats: " + ", ".join(f"{f} {n}" for f, n in summary["formats"].items()),
             "duplicates removed: {exact} exact, {normalised} normalised".format(**summary["duplicates_removed"])]
    if "preference_pairs" in summary:
        lines.append(f"preference pairs: {summary['preference_pairs']} (token counts are the chosen side's)")
    if summary["skipped_empty"]:
        lines.append("skipped: " + ", ".join(f"{n} with an empty {f}" for f, n in summary["skipped_empty"].items()))
    lines.append(f"tokens ({summary['tokenizer']}, template {summary['template']}):")
    lines.append(f"  {'':9s} {'mean':>7s} {'median':>7s} {'p90':>6s} {'p99':>6s} {'max':>6s}")
    for name, s in summary["tokens"].items():
        lines.append(f"  {name:9s} {s['mean']:>7.1f} {s['median']:>7.0f} {s['p90']:>6d} {s['p99']:>6d} {s['max']:>6d}")
    lines.append(f"over model_max_length={summary['model_max_length']}: {summary['over_max_length']} "
                 "(truncated, or dropped with --overlong drop)")
    return "\n".join(lines)
