"""Trust on the user's GPU: the kernel self-test and the per-GPU verified state.

- `selftest()` (`gptkernels selftest`): every kernel family against its reference on this GPU (run.py).
- The verified state (state.py): at the first kernel call of a family on a GPU without a cached
  verdict, the family's quick check runs; a family that fails is disabled on that GPU and its ops
  take the PyTorch path. GPTKERNELS_SELFTEST=auto|off|force.
- The error rule every check uses, tests included (rule.py); the checks (families.py, attention_checks.py).

Importing this package installs the verifier as gptkernels._backend's hook.
"""
from gptkernels import _backend
from gptkernels._selftest.families import FAMILIES, OP_FAMILY
from gptkernels._selftest.run import Report, add_parser, main, selftest
from gptkernels._selftest.state import VERIFIER, Verifier

_backend.set_verifier(VERIFIER.reason)

__all__ = ["FAMILIES", "OP_FAMILY", "Report", "VERIFIER", "Verifier", "add_parser", "main", "selftest"]
