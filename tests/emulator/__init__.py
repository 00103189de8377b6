"""The CPU emulator of the CUDA programming model and the emulated kernel tests ' shared harness
(see harness.py and the README section "Emulated kernel tests")."""
