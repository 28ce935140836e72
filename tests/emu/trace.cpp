#include "emu.hpp"
#include "../../kernels/trace.cu"
THOR_EMU_REGISTER(trace_set_f32)
