"""`instructune data inspect`: look at instruction data before spending GPU hours on it.

Counts per format and source, duplicates, prompt/response token lengths for a tokenizer, how many
examples model_max_length would truncate, and a few rendered examples with the learned span marked;
with an output folder, a JSON summary and a histogram PNG.
"""

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from instructune.data.encode import IGNORE_INDEX, encode_conversations
from instructune.data.sources import DatasetSpec, load_mix
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
    def of(cls, values: list[int]) -> "LengthStats":
        ordered = sorted(values)
        def at(q: float) -> int:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        return cls(round(statistics.fmean(ordered), 1), statistics.median(ordered), at(0.9), at(0.99), ordered[-1])


def inspect(specs: list[DatasetSpec], tokenizer, template: str, max_length: int, seed: int = 42,
            show: int = 3) -> tuple[dict, list[str], dict]:
    """(summary, rendered examples with the target span marked, lengths {prompt, response, total})."""
    mix = load_mix(specs, seed=seed)
    examples, _ = encode_conversations(mix.conversations, tokenizer, template, max_length=10**9)
    prompt = [sum(label == IGNORE_INDEX for label in e["labels"]) for e in examples]
    total = [len(e["input_ids"]) for e in examples]
    response = [t - p for t, p in zip(total, prompt)]
    summary = {
        "records": len(mix.conversations),
        "sources": mix.sources,
        "formats": dict(mix.formats),
        "duplicates_removed": {"exact": mix.duplicates["exact"], "normalised": mix.duplicates["normalised"]},
        "skipped_empty": dict(mix.skipped),
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "template": template,
        "model_max_length": max_length,
        "over_max_length": sum(t > max_length for t in total),
        "tokens": {name: asdict(LengthStats.of(values)) for name, values in
                   (("prompt", prompt), ("response", response), ("total", total))},
    }
    shown = [mark_targets(render_segments(c, template, tokenizer)) for c in mix.conversations[:show]]
    return summary, shown, {"prompt": prompt, "response": response, "total": total}


def mark_targets(segments: list[tuple[str, bool]]) -> str:
    return "".join(f"{TARGET_START}{text}{TARGET_END}" if target else text for text, target in segments)


def write_report(summary: dict, lengths: dict, output_dir: Path) -> None:
    with atomic_file(output_dir / "summary.json") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    # a few very long examples would squash the plot: show up to the max length's neighbourhood or the p99
    upper = max(1.25 * summary["model_max_length"], summary["tokens"]["total"]["p99"])
    with png_figure(output_dir / "lengths.png", size=(8, 4)) as (_, axes):
        for name in ("prompt", "response", "total"):
            axes.hist([min(v, upper) for v in lengths[name]], bins=60, range=(0, upper), alpha=0.5, label=name)
        axes.axvline(summary["model_max_length"], color="black", linestyle="--", label="model_max_length")
        axes.set_xlabel(f"tokens (longer ones counted at {upper:.0f})")
        axes.set_ylabel("examples")
        axes.set_title(f"{summary['records']} examples, {summary['over_max_length']} over model_max_length")
        axes.legend()


def format_summary(summary: dict) -> str:
    lines = [f"{summary['records']} records: " + ", ".join(f"{n} from {s}" for s, n in summary["sources"].items()),
             "formats: " + ", ".join(f"{f} {n}" for f, n in summary["formats"].items()),
             "duplicates removed: {exact} exact, {normalised} normalised".format(**summary["duplicates_removed"])]
    if summary["skipped_empty"]:
        lines.append("skipped: " + ", ".join(f"{n} with an empty {f}" for f, n in summary["skipped_empty"].items()))
    lines.append(f"tokens ({summary['tokenizer']}, template {summary['template']}):")
    lines.append(f"  {'':9s} {'mean':>7s} {'median':>7s} {'p90':>6s} {'p99':>6s} {'max':>6s}")
    for name, s in summary["tokens"].items():
        lines.append(f"  {name:9s} {s['mean']:>7.1f} {s['median']:>7.0f} {s['p90']:>6d} {s['p99']:>6d} {s['max']:>6d}")
    lines.append(f"over model_max_length={summary['model_max_length']}: {summary['over_max_length']} "
                 "(truncated, or dropped with --overlong drop)")
    return "\n".join(lines)
