#include "emu.hpp"
#include "../../kernels/probe.cu"
THOR_EMU_REGISTER(probe_cp_async_f32)
THOR_EMU_REGISTER(probe_ldmatrix_b16)
