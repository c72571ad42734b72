"""The student template, its answer key and the fixtures generated from them."""
from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "student_template"
FIXTURES = ROOT / "fixtures"


def _load_make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_fixtures", module)
    spec.loader.exec_module(module)
    return module


mf = _load_make_fixtures()
MUTANTS = {m.name: m for m in mf.mutants()}
EXPECTED_KEYS = {"diagnoses", "failing_checks", "failures", "score_band", "note"}


def code_sources(path: Path) -> list[tuple[str, str]]:
    nb = nbformat.read(str(path), as_version=4)
    return [(c.id, c.source) for c in nb.cells if c.cell_type == "code"]


def python_source(source: str) -> str:
    """A cell's code with IPython magics and shell escapes commented out."""
    return "\n".join("# " + line if line.lstrip().startswith(("%", "!")) else line
                     for line in source.split("\n"))


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fixtures")
    mf.build_all(out)
    return out


# ----------------------------------------------------------------------------- fixtures

def test_committed_fixtures_equal_the_script_output(generated):
    written = sorted(p.name for p in generated.iterdir())
    assert written == sorted(mf.fixture_names())
    for name in written:
        made, committed = generated / name, FIXTURES / name
        assert committed.exists(), f"fixtures/{name} is missing: run fixtures/make_fixtures.py"
        if made.is_dir():
            assert files_under(committed) == files_under(made), (
                f"fixtures/{name} differs from what make_fixtures.py writes: regenerate it")
        else:
            assert committed.read_bytes() == made.read_bytes(), name


def test_build_is_deterministic(generated, tmp_path):
    paths = mf.build_all(tmp_path)
    assert [p.name for p in paths] == mf.fixture_names()
    for path in paths:
        other = generated / path.name
        if path.is_dir():
            assert files_under(path) == files_under(other), path.name
        else:
            assert path.read_bytes() == other.read_bytes(), path.name


def test_build_all_leaves_other_files_alone(tmp_path):
    keep = tmp_path / "data" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("mine")
    stale = tmp_path / "solution" / "stale.txt"
    stale.parent.mkdir()
    stale.write_text("old")
    mf.build_all(tmp_path)
    assert keep.read_text() == "mine"
    assert not stale.exists()


@pytest.mark.parametrize("name", [n for n in mf.fixture_names() if not n.startswith("zip-slip")])
def test_expected_json_shape(generated, name):
    data = json.loads((generated / name / "expected.json").read_text())
    assert EXPECTED_KEYS <= set(data) <= EXPECTED_KEYS | {"warnings"}
    assert all(isinstance(w, str) for w in data.get("warnings", []))
    assert all(isinstance(d, str) for d in data["diagnoses"] + data["failing_checks"])
    assert all(set(f) == {"notebook", "kind"} for f in data["failures"])
    lo, hi = data["score_band"]
    assert 0 <= lo <= hi <= 100
    assert data["note"]


def test_zip_slip_archive(generated):
    import zipfile

    with zipfile.ZipFile(generated / "zip-slip.zip") as archive:
        names = archive.namelist()
        solution = files_under(generated / "solution")
        for name, data in solution.items():
            if name != "expected.json":
                assert archive.read(name) == data
    assert "../slimgrade-zip-escape" in names
    assert "/tmp/slimgrade-zip-abs" in names
    assert "expected.json" not in names
    assert set(json.loads((generated / "zip-slip.expected.json").read_text())) == EXPECTED_KEYS


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_differs_only_where_it_was_edited(generated, name):
    mutant = MUTANTS[name]
    solution, folder = generated / "solution", generated / name
    assert mutant.touches, name
    for notebook in mf.NOTEBOOKS:
        if notebook in mutant.remove:
            assert not (folder / notebook).exists()
            continue
        ours, theirs = code_sources(solution / notebook), code_sources(folder / notebook)
        if notebook in mutant.touches:
            assert ours != theirs, f"{name}: {notebook} was meant to change"
        else:
            assert ours == theirs, f"{name}: {notebook} should equal the solution's"
    for path, data in files_under(solution).items():
        if path.startswith("models/"):
            assert (folder / path).read_bytes() == data


def test_mutant_edits_are_small(generated):
    """Apart from the Colab reshaping, a mutant changes at most two code cells."""
    for name, mutant in MUTANTS.items():
        if name == mf.COLAB:
            continue
        changed = 0
        for notebook in mutant.touches - set(mutant.remove):
            pairs = zip(code_sources(generated / "solution" / notebook),
                        code_sources(generated / name / notebook), strict=True)
            changed += sum(a != b for a, b in pairs)
        assert changed <= 2, name


def test_solution_and_mutants_parse(generated):
    for folder in [generated / "solution", *(generated / n for n in MUTANTS)]:
        for notebook in mf.NOTEBOOKS:
            path = folder / notebook
            if not path.exists():
                continue
            nbformat.validate(nbformat.read(str(path), as_version=4))
            for cell_id, source in code_sources(path):
                if folder.name == "syntax-error" and notebook == mf.PRUNE and cell_id == "mask":
                    with pytest.raises(SyntaxError):
                        ast.parse(python_source(source))
                else:
                    ast.parse(python_source(source))


def test_colab_fixture_looks_like_the_course(generated):
    folder = generated / mf.COLAB
    for notebook in mf.NOTEBOOKS:
        nb = nbformat.read(str(folder / notebook), as_version=4)
        assert not any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "drive.mount('/content/drive')" in code and "%cd /content/drive" in code
        assert ".cuda()" in code and "DEVICE" not in code and "map_location" not in code
        assert "from models import vgg" in code
        assert "# >>> BLANK" not in code
    prune = "\n".join(s for _, s in code_sources(folder / mf.PRUNE))
    assert "PRUNE_PERCENT = 0.5" in prune and "PRUNE_PERCENT = 0.9" in prune
    assert prune.count("checkpoint = torch.load(WEIGHT_PATH)") == 2
    assert "datasets.CIFAR10('./data'," in prune


# ----------------------------------------------------------------------------- course family

COURSE_MUTANTS = {m.name: m for m in mf.course_mutants()}


def test_course_family_is_registered():
    names = mf.course_fixture_names()
    assert names[0] == mf.COURSE_SOLUTION and set(names[1:]) == set(COURSE_MUTANTS)
    assert all(n.startswith("course-") for n in names)
    assert set(names) <= set(mf.fixture_names())
    assert not set(names) & ({mf.SOLUTION} | set(MUTANTS))


@pytest.mark.parametrize("name", sorted(COURSE_MUTANTS))
def test_course_mutant_differs_from_the_course_base_where_edited(generated, name):
    mutant = COURSE_MUTANTS[name]
    base, folder = generated / mf.COURSE_SOLUTION, generated / name
    assert mutant.touches == {mf.PRUNE}, name
    for notebook in mf.NOTEBOOKS:
        ours, theirs = code_sources(base / notebook), code_sources(folder / notebook)
        if notebook in mutant.touches:
            # the same slip in both pruning halves (0.9, then 0.5), nowhere else
            changed = [a[0] for a, b in zip(ours, theirs, strict=True) if a != b]
            assert len(changed) == 2 and {c.rsplit("-", 1)[1] for c in changed} == {"90", "50"}, \
                (name, changed)
        else:
            assert ours == theirs, f"{name}: {notebook} should equal the course base's"
    assert files_under(base / "models") == files_under(folder / "models")


def test_course_family_parses(generated):
    for name in mf.course_fixture_names():
        for notebook in mf.NOTEBOOKS:
            path = generated / name / notebook
            nb = nbformat.read(str(path), as_version=4)
            nbformat.validate(nb)
            assert nb.metadata["colab"] and nb.metadata["kernelspec"]["name"] == "python3"
            for _, source in code_sources(path):
                ast.parse(python_source(source))


def test_course_base_has_the_patterns_of_real_hand_ins(generated):
    """../shared/LAB.md section 8, one assertion per pattern."""
    folder = generated / mf.COURSE_SOLUTION
    code = {n: "\n".join(s for _, s in code_sources(folder / n)) for n in mf.NOTEBOOKS}
    drive = "/content/drive/MyDrive/Colab Notebooks"
    for notebook, text in code.items():
        nb = nbformat.read(str(folder / notebook), as_version=4)
        assert not any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
        assert "from google.colab import drive\ndrive.mount('/content/drive')" in text
        assert f"%cd {drive}/AI_lab4" in text
        assert "CUDA = True\n" in text and ".cuda()" in text and "Variable(data)" in text
        assert "map_location" not in text and "DEVICE" not in text and "# >>> BLANK" not in text
        assert "from models import vgg" in text
        settings = ("WEIGHT_PATH =", "PRUNE_PATH =", "PRUNE_FINETUNE_PATH =")
        for path in [line.split("'")[1] for line in text.splitlines()
                     if line.startswith(settings)]:
            assert path.startswith(drive + "/") and "AI_lab4" not in path, path
    sparsity, prune, finetune = code[mf.SPARSITY], code[mf.PRUNE], code[mf.FINETUNE]
    # three lambdas one after the other, the chosen one last, each overwriting model_best.pth
    lambdas = [line for line in sparsity.splitlines() if line.startswith("LAMBDA = ")]
    assert lambdas == ["LAMBDA = 0", "LAMBDA = 1e-3", "LAMBDA = 1e-4"]
    assert sparsity.count("EPOCHS = 120\n") == 3 and sparsity.count("for i in range(120):") == 3
    assert sparsity.count("plt.plot(iteration, accuracy)") == 3 and "plt.hist(" in sparsity
    assert sparsity.count("RESUME = False") == 3 and "if RESUME:" in sparsity
    assert "m.weight.grad.data.add_(LAMBDA * torch.sign(m.weight.data))" in sparsity
    step = "updateBN()\n        optimizer.step()"
    assert sparsity.index("loss.backward()") < sparsity.index(step)
    assert "if epoch in [EPOCHS * 0.5, EPOCHS * 0.75]:" in sparsity
    assert "'best_prec1': best_prec1" in sparsity
    assert sparsity.index("torch.save(") < sparsity.index("best_prec1 = max(prec1, best_prec1)")
    for text in (sparsity, finetune):
        assert "size_average=False" in text and "shuffle=True, **kwargs)" in text
        assert text.count("datasets.CIFAR10('./data', train=") == 2 and "download=True" in text
    # both ratios in one vggprune, PRUNE_PATH written twice, the course's names and prints
    assert [line for line in prune.splitlines() if line.startswith("PRUNE_PERCENT")] == \
        ["PRUNE_PERCENT = 0.9", "PRUNE_PERCENT = 0.5"]
    assert prune.count("PRUNE_PATH = ") == 2
    assert prune.count("checkpoint = torch.load(WEIGHT_PATH)") == 2
    assert prune.count("mask = weight_copy.abs().gt(threshold).float().cuda()") == 2
    assert prune.count("idx1 = np.squeeze(np.argwhere(np.asarray(end_mask.cpu().numpy())))") == 4
    assert prune.count("if idx1.size == 1:") == 4 and "< 3" not in prune and "topk" not in prune
    for needle in ["layer index: ", "PRUNE RATIO=", "PREPROCESSING SUCCESSFUL!",
                   "Test set: Accuracy: ", "LOADING CHECKPOINT", "threshold = y[thre_index]",
                   "cfg_mask.append(", "newmodel = vgg(cfg=cfg)", "shuffle=True"]:
        assert needle in prune, needle
    # train_prune_model: RESUME = True loads the pruned model; the optimizer comes after
    assert "RESUME = True\nPRUNE_PATH = " in finetune and "model = None\nif(RESUME):" in finetune
    assert "model = vgg(cfg=checkpoint['cfg'])" in finetune and "RESUME PRUNE MODEL" in finetune
    assert finetune.index("if(RESUME):") < finetune.index("optim.SGD(model.parameters()")
    assert "TRAIN PRUNED MODEL DONE!" in finetune and "PRUNE_FINETUNE_PATH)" in finetune
    assert "updateBN" not in finetune


def test_course_expectations(generated):
    def manifest(name):
        return json.loads((generated / name / "expected.json").read_text())

    for name in mf.course_fixture_names():
        data = manifest(name)
        assert not data["failures"] and "range(120)" in data["note"], name
    assert manifest(mf.COURSE_SOLUTION)["score_band"] == [60, 60]
    assert manifest("course-first-k")["warnings"] == ["min-channel-first-k"]
    assert manifest("course-no-guard")["warnings"] == ["single-channel-index"]
    for name in ("course-first-k", "course-no-guard"):
        assert manifest(name)["score_band"] == [60, 60] and not manifest(name)["diagnoses"]


# ----------------------------------------------------------------------------- template

def template_regions() -> list[tuple[str, str, str]]:
    found = []
    for notebook in mf.NOTEBOOKS:
        for _, source in code_sources(TEMPLATE / notebook):
            found += [(notebook, r.kind, r.id) for r in mf.find_regions(source)]
    return found


def test_template_has_each_region_once():
    regions = template_regions()
    blanks = sorted(r[2] for r in regions if r[1] == "BLANK")
    todos = sorted(r[2] for r in regions if r[1] == "TODO")
    assert blanks == sorted(mf.BLANK_IDS)
    assert todos == sorted(mf.TODO_IDS)
    where = {r[2]: r[0] for r in regions}
    assert where["lambda"] == where["updateBN"] == mf.SPARSITY
    assert all(where[i] == mf.PRUNE for i in mf.BLANK_IDS[2:] + mf.TODO_IDS)


def test_every_region_has_an_answer():
    answers = mf.load_answers()
    assert set(answers) == set(mf.BLANK_IDS) | set(mf.TODO_IDS)
    for code in answers.values():
        assert code.strip() and code.endswith("\n")


def test_template_placeholders_and_parameters_cell():
    for notebook in mf.NOTEBOOKS:
        nb = nbformat.read(str(TEMPLATE / notebook), as_version=4)
        assert nb.cells[0].cell_type == "markdown"
        tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, notebook
        imports = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"][0]
        assert imports < tagged[0] and "import torch" in nb.cells[imports].source
        assert all(c.cell_type != "code" or not c.outputs for c in nb.cells)
    sources = {n: "\n".join(s for _, s in code_sources(TEMPLATE / n)) for n in mf.NOTEBOOKS}
    assert sources[mf.SPARSITY].count("NotImplementedError") == 1
    assert sources[mf.PRUNE].count("NotImplementedError") == 5
    assert "LAMBDA = None  # your value" in sources[mf.SPARSITY]


def test_marker_parser_rejects_broken_regions():
    with pytest.raises(ValueError):
        mf.find_regions("# >>> BLANK a: x\npass\n")
    with pytest.raises(ValueError):
        mf.find_regions("# >>> BLANK a: x\npass\n# <<< BLANK b\n")
    with pytest.raises(ValueError):
        mf.find_regions("# >>> BLANK a no colon\n# <<< BLANK a\n")
    assert mf.fill_regions("    # >>> TODO t: do\n    pass\n    # <<< TODO t", {"t": "x = 1\n"}) \
        == "    # >>> TODO t: do\n    x = 1\n    # <<< TODO t"


def test_solution_has_no_placeholders(generated):
    for notebook in mf.NOTEBOOKS:
        sources = [s for _, s in code_sources(generated / "solution" / notebook)]
        text = "\n".join(sources)
        assert "NotImplementedError" not in text
        assert "fill in BLANK" not in text
        assert "# your value" not in text
        for source in sources:  # markers kept, bodies filled
            for region in mf.find_regions(source):
                body = source.split("\n")[region.start + 1:region.end]
                assert any(line.strip() and line.strip() != "pass" for line in body)


def test_solution_keeps_the_course_names(generated):
    text = {n: "\n".join(s for _, s in code_sources(generated / "solution" / n))
            for n in mf.NOTEBOOKS}
    for needle in ["LAMBDA = 1e-4", "def updateBN():", "def train(epoch):", "def test():",
                   "torch.save({'epoch': epoch + 1, 'state_dict': model.state_dict(),",
                   "'best_prec1': best_prec1, 'optimizer': optimizer.state_dict()}, WEIGHT_PATH)",
                   "datasets.CIFAR10(DATA_ROOT, train=True, download=True,"]:
        assert needle in text[mf.SPARSITY], needle
    for needle in ["LOADING CHECKPOINT", "NO CHECKPOINT FOUND", "layer index: {k} \\t total channel:",
                   "PRUNE RATIO={pruned_ratio}", "PREPROCESSING SUCCESSFUL!",
                   "threshold = y[thre_index]", "newmodel = vgg(cfg=cfg).to(DEVICE)",
                   "torch.save({'cfg': cfg, 'state_dict': newmodel.state_dict()}, PRUNE_PATH)",
                   "map_location=DEVICE"]:
        assert needle in text[mf.PRUNE], needle
    for needle in ["model = vgg(cfg=checkpoint['cfg']).to(DEVICE)", "RESUME PRUNE MODEL",
                   "TRAIN PRUNED MODEL DONE!", "PRUNE_FINETUNE_PATH"]:
        assert needle in text[mf.FINETUNE], needle


def test_template_model_matches_reference():
    from reference.model import vgg as reference_vgg

    spec = importlib.util.spec_from_file_location("template_vgg", TEMPLATE / "models" / "vgg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.defaultcfg == [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                 512, 512, 512, 512, "M", 512, 512, 512, 512]
    torch.manual_seed(0)
    ours, theirs = module.vgg(), reference_vgg()
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 20_035_018
    bns = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 16 and sum(b.num_features for b in bns) == 5504
    assert all(torch.all(b.weight == 0.5) and torch.all(b.bias == 0) for b in bns)
    assert torch.all(ours.classifier.bias == 0)
    assert abs(float(ours.classifier.weight.detach().std()) - 0.01) < 0.002
    thin = module.vgg(cfg=[4, "M", 6, "M", 5, "M", 3, "M", 7])
    assert thin(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert theirs.load_state_dict(ours.state_dict()) is not None
    source = (TEMPLATE / "models" / "vgg.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import", "from"))]
    assert all("torch" in line for line in imports)


# ----------------------------------------------------------------------------- running

NARROW_CFG = [4, 4, "M", 8, 8, "M", 16, 16, 16, 16, "M", 32, 32, 32, 32, "M", 32, 32, 32, 32]

FAKE_DATA_CELL = f'''
import importlib
import numpy as _np
import torch
import torch.utils.data as _data
import torchvision
from PIL import Image as _Image


class _FakeCIFAR10(_data.Dataset):
    """200 random 32x32 RGB images, labels 0..9 in turn; each class has its own tint."""
    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        rng = _np.random.default_rng(0 if train else 1)
        self.targets = [i % 10 for i in range(200)]
        tint = _np.random.default_rng(2).integers(40, 216, size=(10, 1, 1, 3))
        noise = rng.integers(-40, 41, size=(200, 32, 32, 3))
        self.data = _np.clip(tint[self.targets] + noise, 0, 255).astype(_np.uint8)
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = _Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


torchvision.datasets.CIFAR10 = _FakeCIFAR10
torch.set_num_threads(1)
importlib.import_module('models.vgg').defaultcfg = {NARROW_CFG!r}
'''

OVERRIDES = {
    mf.SPARSITY: "EPOCHS = 2\nTEST_BATCH_SIZE = 200\nDEVICE = 'cpu'\nCUDA = False",
    mf.PRUNE: "TEST_BATCH_SIZE = 200\nDEVICE = 'cpu'\nCUDA = False",
    mf.FINETUNE: "EPOCHS = 2\nTEST_BATCH_SIZE = 200\nDEVICE = 'cpu'\nCUDA = False",
}


def run_notebook(path: Path, workdir: Path, overrides: str, timeout: int = 60) -> nbformat.NotebookNode:
    """Run ``path`` in ``workdir`` with fake data, a narrow VGG and ``overrides``."""
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    setup = nbformat.v4.new_code_cell(FAKE_DATA_CELL)
    setup.id = "test-setup"
    params = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(overrides)
    injected.id = "test-parameters"
    nb.cells.insert(params + 1, injected)
    nb.cells.insert(0, setup)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def stream_text(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream")


@pytest.mark.slow
def test_solution_notebooks_run_on_cpu(generated, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(generated / "solution", work)
    texts = {}
    for notebook in mf.NOTEBOOKS:
        texts[notebook] = stream_text(run_notebook(work / notebook, work, OVERRIDES[notebook]))

    lab_keys = {"epoch", "state_dict", "best_prec1", "optimizer"}
    best = torch.load(work / "model_best.pth", map_location="cpu", weights_only=True)
    pruned = torch.load(work / "model_prune.pth", map_location="cpu", weights_only=True)
    tuned = torch.load(work / "model_prune_finetune.pth", map_location="cpu", weights_only=True)
    assert set(best) == lab_keys and set(tuned) == lab_keys
    assert set(pruned) == {"cfg", "state_dict"}
    assert best["state_dict"]["feature.0.weight"].shape[0] == NARROW_CFG[0]

    from reference.model import cfg_from_state_dict, vgg as reference_vgg

    assert cfg_from_state_dict(pruned["state_dict"]) == pruned["cfg"]
    assert cfg_from_state_dict(tuned["state_dict"]) == pruned["cfg"]
    reference_vgg(cfg=pruned["cfg"]).load_state_dict(pruned["state_dict"])

    # The notebook's pruning equals the trusted one, tensor for tensor.
    from reference.prune import prune

    original = reference_vgg(cfg=NARROW_CFG)
    original.load_state_dict(best["state_dict"])
    thin, result = prune(original, 0.5, min_channels=3)
    assert result.cfg == pruned["cfg"]
    trusted = thin.state_dict()
    assert set(trusted) == set(pruned["state_dict"])
    for key, tensor in pruned["state_dict"].items():
        assert torch.equal(tensor, trusted[key]), key

    prune_out = texts[mf.PRUNE]
    assert "LOADING CHECKPOINT model_best.pth @EPOCH=" in prune_out
    assert "PREPROCESSING SUCCESSFUL!" in prune_out and "PRUNE RATIO=" in prune_out
    assert prune_out.count("layer index: ") == 16
    accuracies = [line for line in prune_out.splitlines() if line.startswith("Test set: Accuracy:")]
    assert len(accuracies) == 2 and accuracies[0] == accuracies[1]  # masked == thin
    assert "RESUME PRUNE MODEL" in texts[mf.FINETUNE]
    assert "TRAIN PRUNED MODEL DONE!" in texts[mf.FINETUNE]
