#include "emu.hpp"
#include "../../kernels/rule.cu"
THOR_EMU_REGISTER(trace_rule_f32)
THOR_EMU_REGISTER(rule_tally_f32)
