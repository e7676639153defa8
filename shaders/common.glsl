// Helpers shared by every kernel.
//
// 16-bit values (f16, bf16) are read from 32-bit words so that no kernel needs the optional
// 16-bit storage feature; element i of a packed array lives in word i/2, low half first.
#extension GL_EXT_control_flow_attributes : enable
#ifdef USE_SUBGROUP
#extension GL_KHR_shader_subgroup_basic : enable
#extension GL_KHR_shader_subgroup_arithmetic : enable
#endif

float f16_bits_to_float(uint bits) { return unpackHalf2x16(bits).x; }
float bf16_bits_to_float(uint bits) { return uintBitsToFloat(bits << 16); }
uint half_of_word(uint word, uint index) { return (index & 1u) != 0u ? (word >> 16) : (word & 0xFFFFu); }

#define NEG_INF uintBitsToFloat(0xFF800000u)

