#include "emu.hpp"
#include "../../kernels/invert.cu"
THOR_EMU_REGISTER(invert_chol_b32_f32)
THOR_EMU_REGISTER(invert_chol_b64_f32)
THOR_EMU_REGISTER(invert_chol_b128_f32)
THOR_EMU_REGISTER(invert_chol_b256_f32)
THOR_EMU_REGISTER(invert_chol_b128x2_f32)
THOR_EMU_REGISTER(invert_blocked_b32_f32)
THOR_EMU_REGISTER(invert_blocked_b64_f32)
THOR_EMU_REGISTER(invert_blocked_b128_f32)
