"""Benchmark of Lab 5's trusted evaluation against a raw forward of the same model.

    .venv/bin/python bench/lab5.py [FIXTURE] [--repeats 3]

FIXTURE is a Lab 5 hand-in folder (default: fixtures/lowcomplexity/honest). The model is
built here from the fixture notebook's own definitions (our fixture, so trusted here) and
its weights, and exported as the sandboxed kernel exports it. Then, on the quick
profile's test set and training sample, side by side, ``--repeats`` times in turn:

* trusted: what the grader does outside the sandbox: load the export (the JSON checked
  op by op, the tensors with ``weights_only``), count parameters and FLOPs on the graph,
  and compute top-1 accuracy from the logits of the exported program;
* raw: the eager ``nn.Module`` itself, forward on the same images in the same batches.

``--full-size`` repeats the stand-in's images up to the full profile's counts (10,000 test
images and a 10,000-image training sample), where the fixed cost of loading the export is
spread over more images.

It prints the median time of each and raw / trusted (the target is 0.8 or more: checking
and running the export costs at most a quarter more than a plain forward). The figures are
printed only; a person records them in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from labs.lowcomplexity.bundle import load_data  # noqa: E402
from labs.lowcomplexity.export import export_model  # noqa: E402
from labs.lowcomplexity.grading import _transforms, definitions_only  # noqa: E402
from labs.lowcomplexity.measure import accuracy, count, load_program  # noqa: E402
from labs.lowcomplexity.profiles import QUICK  # noqa: E402
from labs.lowcomplexity.runtime import (_install_cifar100, _model,  # noqa: E402
                                        _transforms as recorded_transforms)


def fixture_model(folder: Path) -> tuple[torch.nn.Module, dict]:
    """The fixture's model with its weights, and the normalisation it was trained with."""
    _install_cifar100()  # as in the kernel: the notebook's CIFAR100 never downloads
    namespace: dict = {"__name__": "__main__"}
    for cell in definitions_only(nbformat.read(folder / "lowcomplexity.ipynb", as_version=4)).cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, str(folder), "exec"), namespace)  # our own fixture
    weights = torch.load(folder / "model.pth", map_location="cpu", weights_only=True)
    model, _ = _model(namespace, weights)
    if model is None:
        raise SystemExit(f"{folder}: no model of the notebook takes its weights")
    return model.eval(), _transforms(recorded_transforms(namespace))["used"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixture", type=Path, nargs="?",
                        default=ROOT / "fixtures" / "lowcomplexity" / "honest")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-size", action="store_true",
                        help="as many images as the full profile measures (CIFAR-100's 10,000 "
                             "test images and a 10,000-image training sample), the stand-in's "
                             "repeated")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a grading's measurement shares the machine's cores
    model, norm = fixture_model(args.fixture)
    data = load_data(QUICK, None)
    sample = slice(0, QUICK.train_sample)
    images = [(data.test.images, data.test.labels),
              (data.train.images[sample], data.train.labels[sample])]
    if args.full_size:
        images = [(x.repeat(-(-10_000 // len(y)), axis=0)[:10_000],
                   y.repeat(-(-10_000 // len(y)))[:10_000]) for x, y in images]
    with tempfile.TemporaryDirectory() as scratch:
        export = Path(scratch) / "export"
        if not export_model(model, export)["exported"]:
            raise SystemExit(f"{args.fixture}: the model does not export")

        def trusted() -> list[float]:
            program = load_program(export, Path(scratch))
            count(program)
            return [accuracy(program, x, y, norm["mean"], norm["std"]) for x, y in images]

        def raw() -> list[float]:
            with torch.no_grad():
                return [accuracy(model, x, y, norm["mean"], norm["std"]) for x, y in images]

        times: dict[str, list[float]] = {"trusted": [], "raw": []}
        results = {}
        for _ in range(args.repeats):
            for name, step in (("trusted", trusted), ("raw", raw)):
                started = time.perf_counter()
                results[name] = step()
                times[name].append(time.perf_counter() - started)
    trusted_s, raw_s = statistics.median(times["trusted"]), statistics.median(times["raw"])
    images_n = sum(len(y) for _, y in images)
    print(f"Lab 5 evaluation of {args.fixture.name}: {images_n} images, one torch thread, "
          f"median of {args.repeats}")
    print(f"trusted (load the checked export, count, accuracy): {trusted_s:.2f} s; "
          f"accuracies {results['trusted']}")
    print(f"raw forward of the eager model: {raw_s:.2f} s; accuracies {results['raw']}")
    print(f"ratio raw / trusted: {raw_s / trusted_s:.2f} (target 0.8 or more)")


if __name__ == "__main__":
    main()
