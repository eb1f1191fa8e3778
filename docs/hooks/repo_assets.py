"""mkdocs hook: files of the repository that pages show but that live outside `docs/`.

The plots stay where the benchmark wrote it (`benchmarks/`, which the README also
shows); this hook adds it to the site as `assets/<name>`, so pages link to it without a copy.
Registered under `hooks:` in mkdocs.yml.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ASSETS = {"assets/reasoner_accuracy_vs_budget.png":
          REPO / "benchmarks" / "reasoner_accuracy_vs_budget.png",
          "assets/distill_curves_bundled_b68.png":
          REPO / "benchmarks" / "distill_curves_bundled_b68.png",
          "assets/distill_curves_bundled_b40.png":
          REPO / "benchmarks" / "distill_curves_bundled_b40.png",
          "assets/distill_curves_chain_b68.png":
          REPO / "benchmarks" / "distill_curves_chain_b68.png"}


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, source in ASSETS.items():
        files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files
