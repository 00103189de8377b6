"""The CPU emulator of the CUDA programming model and the harness the emulated kernel tests share
(see harness.py and the README section "Emulated kernel tests")."""
