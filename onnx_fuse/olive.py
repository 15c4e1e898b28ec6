"""onnx-fuse as a Microsoft Olive pass: `OnnxFusePass`, with the command's target, check and cache
options (needs olive-ai: `pip install 'onnx-fuse[olive]'`).

Olive finds passes through its package configuration, a JSON that maps a pass type to a module
path; a workflow that uses a pass of another package runs with a configuration that names it
(`olive run --config workflow.json --package-config onnx_fuse_olive.json`, or
`olive.workflows.run(workflow, package_config=...)`). `package_config()` gives Olive's own
configuration with this pass added, so a workflow can mix it with Olive's passes:

    python -m onnx_fuse.olive onnx_fuse_olive.json     # writes the configuration

    {"input_model": {"type": "ONNXModel", "model_path": "model.onnx"},
     "passes": {"fuse": {"type": "OnnxFusePass", "target": "onnx", "max_positions": 128}}}

The pass fails (Olive reports the error) rather than hand on a model that did not check: the
same guarantee as the command. The fuse report is kept in the output model's attributes
(`onnx_fuse_report`, in Olive's model_config.json) and, where `report` / `report_html` name
files, written there as JSON / as the HTML page of `--report-html`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, Union

from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from .api import fuse
from .model_io import external_files
from .tolerances import parse_tolerances

PASS_TYPE = "OnnxFusePass"

Tolerance = Optional[Union[float, list[str]]]  # 1e-4, or Polygraphy's ["1e-4", "logits:1e-3"]


class OnnxFusePass(Pass):
    """Fuse attention, masks, RoPE and KV-cache writes for a target, proving the result equal
    to the input in onnxruntime (onnx-fuse)."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        def param(type_, default, description):
            return PassConfigParam(type_=type_, default_value=default, description=description)

        return {
            "target": param(str, "onnx", "What to emit: onnx, primitive-trt, ..."),
            "check": param(bool, True, "Prove the result equal to the input in onnxruntime."),
            "max_positions": param(Optional[int], None, "Positions the RoPE caches cover where "
                                                        "the graph does not bound them."),
            "kv_cache": param(Optional[str], None, "'static': turn caches that grow by Concat "
                                                   "into fixed caches of max_cache_len slots."),
            "max_cache_len": param(Optional[int], None, "Cache slots for kv_cache 'static'."),
            "atol": param(Tolerance, None, "Absolute tolerance of the check, for every output "
                                           "or per output ('logits:1e-3')."),
            "rtol": param(Tolerance, None, "Relative tolerance of the check, as atol."),
            "check_batch": param(Optional[int], None, "Batch of the check's synthesized inputs."),
            "report": param(Optional[str], None, "Write the JSON report to this file."),
            "report_html": param(Optional[str], None, "Write the HTML report to this file."),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        output = resolve_onnx_path(output_model_path, Path(model.model_path).name)
        extra = {} if config.kv_cache is None else {"kv_cache": config.kv_cache,
                                                    "max_cache_len": config.max_cache_len}
        result = fuse(model.model_path, target=config.target, check=config.check,
                      max_positions=config.max_positions, check_batch=config.check_batch,
                      tolerances=parse_tolerances(_as_list(config.atol), _as_list(config.rtol)),
                      **extra)
        result.save(output)
        _write_reports(config, result.report, Path(model.model_path).name)
        attributes = {**(model.model_attributes or {}), "onnx_fuse_report": result.report}
        if external_files(result.proto):  # the model and its data files: Olive keeps the folder
            return ONNXModelHandler(model_path=os.path.dirname(output),
                                    onnx_file_name=os.path.basename(output),
                                    model_attributes=attributes)
        return ONNXModelHandler(model_path=output, model_attributes=attributes)


def _write_reports(config, report: dict, title: str) -> None:
    if config.report:
        Path(config.report).write_text(json.dumps(report, indent=2), encoding="utf-8")
    if config.report_html:
        from .report_html import render

        Path(config.report_html).write_text(render(report, title), encoding="utf-8")


def _as_list(tolerance: Tolerance) -> list[str] | None:
    if tolerance is None:
        return None
    return [str(tolerance)] if isinstance(tolerance, (int, float)) else list(tolerance)


def package_config() -> dict:
    """Olive's package configuration with OnnxFusePass added."""
    from olive.package_config import OlivePackageConfig

    with open(OlivePackageConfig.get_default_config_path(), encoding="utf-8") as f:
        config = json.load(f)
    config.setdefault("passes", {})[PASS_TYPE] = {
        "module_path": f"onnx_fuse.olive.{OnnxFusePass.__name__}",  # not __name__: __main__ under -m
        "supported_providers": ["*"],
        "supported_accelerators": ["*"],
        "supported_precisions": ["*"],
    }
    return config


def main(argv: list[str] | None = None) -> int:
    """`python -m onnx_fuse.olive PATH`: write the package configuration to PATH."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m onnx_fuse.olive PACKAGE_CONFIG.json", file=sys.stderr)
        return 2
    with open(argv[0], "w", encoding="utf-8") as f:
        json.dump(package_config(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
