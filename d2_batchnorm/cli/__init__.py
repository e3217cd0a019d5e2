"""
The ``d2bn`` command: ``d2bn <command> [args]``, one command per module of this package
(``tools/*.py`` are thin wrappers around the same functions)::

    d2bn train        --config-file X.yaml --num-gpus 2 [KEY VALUE ...]   (train_net)
    d2bn lazy-train   --config-file X.py --num-gpus 2 [key=value ...]     (lazyconfig_train_net)
    d2bn compare      [LABEL=]RUN ... [--seeds K] [-- options]            (compare)
    d2bn audit        --config-file X [--eval MODEL.WEIGHTS w.pth]        (bn_audit)
    d2bn precise-bn   --config-file X MODEL.WEIGHTS w.pth                 (precise_bn_checkpoint)
    d2bn export       --config-file X --output DIR MODEL.WEIGHTS w.pth    (export_model)

``d2bn <command> --help`` prints the command's manual.
"""
import importlib
import sys

__all__ = ["COMMANDS", "main"]

#: command -> (module of d2_batchnorm.cli, its function taking argv and returning the exit status)
COMMANDS = {
    "train": ("train_net", "cli"),
    "lazy-train": ("lazyconfig_train_net", "cli"),
    "compare": ("compare", "main"),
    "audit": ("bn_audit", "cli"),
    "precise-bn": ("precise_bn_checkpoint", "cli"),
    "export": ("export_model", "main"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: command {argv[0]!r} is not allowed; allowed commands: {list(COMMANDS)}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module, function = COMMANDS[argv[0]]
    sys.argv[0] = f"d2bn {argv[0]}"
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)(argv[1:]) or 0
