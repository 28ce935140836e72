#include "emu.hpp"
#include "../../kernels/apply.cu"
THOR_EMU_REGISTER(apply_b32_f32)
THOR_EMU_REGISTER(apply_b64_f32)
THOR_EMU_REGISTER(apply_b128_f32)
THOR_EMU_REGISTER(apply_b256_f32)
THOR_EMU_REGISTER(apply_b32_bf16)
THOR_EMU_REGISTER(apply_b64_bf16)
THOR_EMU_REGISTER(apply_b128_bf16)
THOR_EMU_REGISTER(apply_b256_bf16)
THOR_EMU_REGISTER(apply_b64_f32_cf)
THOR_EMU_REGISTER(apply_b64_bf16_cf)
THOR_EMU_REGISTER(apply_b128_f32_cf)
THOR_EMU_REGISTER(apply_b128_bf16_cf)
