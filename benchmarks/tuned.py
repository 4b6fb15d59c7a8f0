"""Install the tables that tuning runs measured into this process, so that one GPU session can
tune and then benchmark with the picks before they are pasted into the code:

    python -m benchmarks.tune_dense --out tune-dense.json
    python -m benchmarks.tune_grouped --out tune-grouped.json
    python -m benchmarks --tuned tune-dense.json,tune-grouped.json

A tune_dense report adds its ``dense_configs`` to moelora.kernels.launchers.DENSE_CONFIGS; a
tune_grouped report its ``grouped_configs`` to GROUPED_CONFIGS, its ``ffn_engines`` to
moelora.ops.moe_ffn.FFN_ENGINES, its ``rows_engines`` to moelora.ops.moe_lora.ROWS_ENGINES and
its ``dense_max_width`` to moelora.ops.moe_lora.DENSE_MAX_WIDTH. The benchmark records what it installed in its
results' meta (``tuned``).
"""

from __future__ import annotations

from typing import Iterable

from moelora.kernels import launchers
from moelora.ops import moe_ffn, moe_lora

from .targets import read_json


def install(paths: Iterable[str]) -> dict:
    """Install the tables of each report; returns {path: what was installed from it}. ValueError naming the
    file where one cannot be read, is not JSON or holds no tuned table."""
    installed = {}
    for path in paths:
        report = read_json(path)
        if not isinstance(report, dict) or not {"dense_configs", "grouped_configs"} & set(report):
            raise ValueError(f"{path}: no tuned table in it (expected the JSON of benchmarks.tune_dense or "
                             "benchmarks.tune_grouped)")
        got = {}
        if report.get("dense_configs"):
            launchers.install_dense_configs(report["dense_configs"])
            got["dense_configs"] = report["dense_configs"]
        if report.get("grouped_configs"):
            launchers.install_grouped_configs(report["grouped_configs"])
            got["grouped_configs"] = report["grouped_configs"]
        if report.get("ffn_engines"):
            moe_ffn.FFN_ENGINES.update({(major, kind, shape_class): engine
                                        for major, kind, shape_class, engine in report["ffn_engines"]})
            got["ffn_engines"] = report["ffn_engines"]
        if report.get("rows_engines"):
            moe_lora.ROWS_ENGINES.update({(major, shape_class): engine
                                          for major, shape_class, engine in report["rows_engines"]})
            got["rows_engines"] = report["rows_engines"]
        if report.get("dense_max_width") is not None:
            moe_lora.DENSE_MAX_WIDTH = int(report["dense_max_width"])
            got["dense_max_width"] = moe_lora.DENSE_MAX_WIDTH
        installed[str(path)] = got
    return installed
