// cudaTypedefs.h: shim for the CPU emulator; everything is in cuda_emu.h (the CUDA toolkit is not used).
#pragma once
#include "../cuda_emu.h"
