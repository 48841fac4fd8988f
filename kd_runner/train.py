"""``kd-train``: compose the Hydra config, run the pipeline, map user mistakes to one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kd_runner.errors import UserError, choices

EXIT_USER_ERROR = 2


def config_dir() -> Path:
    """``conf/`` beside the package in a checkout, or ``kd_runner/conf`` in an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise UserError(f"kd-runner's config folder is missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


def group_options(conf: Path) -> dict[str, list[str]]:
    """Config groups and their options, read from the config folder."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in conf.iterdir() if d.is_dir()}


def check_group_overrides(args: list[str], conf: Path) -> None:
    """Fail in one line on ``group=option`` with an unknown option (Hydra's own error spans many lines)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    groups = group_options(conf)
    candidates = [a for a in args if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException as err:
        raise UserError(f"cannot parse overrides {candidates}: {str(err).splitlines()[0]}") from None
    for o in overrides:
        if o.key_or_group not in groups or o.is_delete():
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for v in values:
            if v not in groups[o.key_or_group] and v != "null":
                raise UserError(f"{o.key_or_group}={v!r} is not a known option; valid: {choices(groups[o.key_or_group])}")


def _report_user_error(err: UserError, run_dir: Path | None = None) -> None:
    print(f"kd-train: error: {err}", file=sys.stderr)
    if run_dir is not None and run_dir.is_dir():
        (run_dir / "error.txt").write_text(f"{err}\n")


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from kd_runner import pipeline

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        rep = pipeline.run(cfg, run_dir)
    except UserError as err:
        _report_user_error(err, run_dir)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("kd-train: interrupted; no report written", file=sys.stderr)
        sys.exit(130)
    print(f"report: {run_dir / 'report.md'}")
    return rep["models"]["student"].get("test_acc_best_val", rep["models"]["student"]["test_acc"])


def main() -> None:
    try:
        check_group_overrides(sys.argv[1:], config_dir())
    except UserError as err:
        _report_user_error(err)
        sys.exit(EXIT_USER_ERROR)
    _hydra_main()


if __name__ == "__main__":
    main()
