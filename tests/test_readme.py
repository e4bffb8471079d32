"""The README's Python examples run as written on the CPU, with the substitutions the README states."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
CPU = [('device = "cuda"', 'device = "cpu"'), ('WanConfig.preset("wan-1.3b")', 'WanConfig.preset("tiny")')]


def test_readme_python_examples_run_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                               # the examples write files (fox.mp4)
    text = README.read_text()
    assert 'To run this on a CPU: `device = "cpu"` and `WanConfig.preset("tiny")`' in text   # the stated substitutions
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    for old, new in CPU:
        assert sum(b.count(old) for b in blocks) == 1, old
        blocks = [b.replace(old, new) for b in blocks]
    ns: dict = {}
    assert torch.is_grad_enabled()                            # as a user runs it: no torch.no_grad()
    for block in blocks:                                      # each block runs on its own, as a user copies one
        mine: dict = {}
        exec(compile(block, str(README), "exec"), mine)
        ns.update(mine)
    cfg, engine = ns["cfg"], ns["engine"]
    assert engine.num_graphs == 2 * cfg.num_chunks * 2 == 28
    assert ns["video"].shape == (1, cfg.out_dim, 2 * cfg.chunk_frames, cfg.height, cfg.width)
    assert ns["video"].dtype == torch.bfloat16 and not ns["video"].requires_grad
    assert ns["chunk_a"].shape == (1, cfg.out_dim, cfg.chunk_frames, cfg.height, cfg.width)
    assert set(ns["outs"]) == {ns["a"], ns["b"]} and list(engine.sessions.values()) == [ns["b"]]
    assert engine.graphs.stats.captures == 3                  # 2 KV lengths at batch 1, then batch 2
    assert ns["g"].stats.captures == 3 and ns["y"].shape == (3, 64) and ns["report"].ok
    assert ns["clip"].shape == (21, 64, 64, 3) and ns["clip"].dtype == torch.uint8 and (tmp_path / "fox.mp4").exists()
    assert ns["first"].shape == (9, 64, 64, 3) and ns["pipe"].engine.sessions == {}
    assert ns["tokens"].shape[0] == 2 and ns["dec"].graphs.stats.captures == 3       # LLM decode: 3 buckets
    assert ns["step"].stats.captures == 1 and ns["step"].stats.verified == 2
    assert ns["cache"].layers[0].cumulative_length.item() == 8 + 31                 # one position per real call


def test_dependencies_are_what_the_package_imports():
    """Runtime dependencies: exactly the third-party modules graphrt imports outside the optional
    extras (safetensors is one: the checkpoint loaders need it)."""
    import ast
    import sys
    import tomllib

    root = README.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]

    def names(reqs):
        import_name = {"pillow": "pil"}               # distributions whose module has another name
        return {import_name.get(n, n) for n in
                (re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].replace("-", "_").lower() for r in reqs)}

    runtime = names(project["dependencies"])
    optional = names(r for extra in project["optional-dependencies"].values() for r in extra)
    imported = set()
    for path in (root / "graphrt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {m.lower() for m in imported} - set(sys.stdlib_module_names) - {"graphrt"}
    assert third_party - optional == runtime, (third_party, runtime, optional)
    assert "safetensors" in runtime and "numpy" in runtime    # numpy: torch warns on every import without it


def test_the_quickstart_leaves_no_video_in_the_clone():
    """The quickstart's generate line writes under /tmp, and a video written in the clone anyway
    (the other examples' ``--out fox.mp4``) is ignored by git."""
    root = README.parent
    quickstart = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    outs = re.findall(r"--out (\S+)", quickstart)
    assert outs and all(o.startswith("/tmp/") for o in outs), outs
    assert "*.mp4" in (root / ".gitignore").read_text().splitlines()
