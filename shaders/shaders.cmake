# Every kernel variant the library embeds: one vkvlm_shader() line each. A variant is a source
# plus preprocessor defines; workgroup sizes and tile shapes are specialization constants set
# at pipeline creation.
set(VKVLM_SHADER_DIR ${CMAKE_CURRENT_LIST_DIR})
set(VKVLM_SPV_DIR ${CMAKE_CURRENT_BINARY_DIR}/spv)
file(MAKE_DIRECTORY ${VKVLM_SPV_DIR})
file(GLOB VKVLM_SHADER_INCLUDES ${VKVLM_SHADER_DIR}/*.glsl ${VKVLM_SHADER_DIR}/*.h)
set(VKVLM_SHADER_NAMES "")
set(VKVLM_SHADER_SPVS "")

function(vkvlm_shader name source)
  set(out ${VKVLM_SPV_DIR}/${name}.spv)
  add_custom_command(
    OUTPUT ${out}
    COMMAND ${CMAKE_COMMAND} -DGLSLANG=${GLSLANG_VALIDATOR} -DSPIRV_VAL=${SPIRV_VAL}
            -DSPIRV_OPT=${SPIRV_OPT} -DSOURCE=${VKVLM_SHADER_DIR}/${source} -DOUTPUT=${out}
            "-DDEFINES=${ARGN}" -DINCLUDE_DIR=${VKVLM_SHADER_DIR}
            -P ${PROJECT_SOURCE_DIR}/cmake/CompileShader.cmake
    DEPENDS ${VKVLM_SHADER_DIR}/${source} ${VKVLM_SHADER_INCLUDES} ${PROJECT_SOURCE_DIR}/cmake/CompileShader.cmake
    COMMENT "SPIR-V ${name}"
    VERBATIM)
  set(VKVLM_SHADER_NAMES ${VKVLM_SHADER_NAMES} ${name} PARENT_SCOPE)
  set(VKVLM_SHADER_SPVS ${VKVLM_SHADER_SPVS} ${out} PARENT_SCOPE)
endfunction()

# Matrix products. W types: f32, f16, bf16, MLX affine q4/q8. x: f32, or f16 through 16-bit storage.
foreach(w f32 f16 bf16 q4 q8)
  string(TOUPPER ${w} W)
  vkvlm_shader(gemv_${w}_x32_sg gemv.comp W_${W} X_F32 USE_SUBGROUP)
  vkvlm_shader(gemv_${w}_x32 gemv.comp W_${W} X_F32)
  vkvlm_shader(gemv_${w}_x16_sg gemv.comp W_${W} X_F16 USE_SUBGROUP)
  vkvlm_shader(gemv_${w}_x16 gemv.comp W_${W} X_F16)
  vkvlm_shader(gemm_${w}_x32 gemm.comp W_${W} X_F32)
  vkvlm_shader(gemm_${w}_x16 gemm.comp W_${W} X_F16)
  vkvlm_shader(gemm_coopmat_${w} gemm_coopmat.comp W_${W})
  vkvlm_shader(matmul_lanes_${w}_x32 matmul_lanes.comp W_${W} X_F32)
  vkvlm_shader(matmul_lanes_${w}_x16 matmul_lanes.comp W_${W} X_F16)
endforeach()

# Normalization.
vkvlm_shader(rmsnorm_sg norm.comp RMS USE_SUBGROUP)
vkvlm_shader(rmsnorm norm.comp RMS)
vkvlm_shader(layernorm_sg norm.comp LAYER USE_SUBGROUP)
vkvlm_shader(layernorm norm.comp LAYER)

# Position encoding and the KV cache.
vkvlm_shader(rope rope.comp)
vkvlm_shader(kv_append kv_append.comp)
vkvlm_shader(kv_append_q4 kv_append.comp KV_Q4)
vkvlm_shader(kv_append_q8 kv_append.comp KV_Q8)

# Attention.
vkvlm_shader(attn_tiled_kv16 attn_tiled.comp KV_F16)
vkvlm_shader(attn_tiled_kv32 attn_tiled.comp KV_F32)
vkvlm_shader(attn_rows_kv16_sg attn_rows.comp KV_F16 USE_SUBGROUP)
vkvlm_shader(attn_rows_kv16 attn_rows.comp KV_F16)
vkvlm_shader(attn_rows_kv32_sg attn_rows.comp KV_F32 USE_SUBGROUP)
vkvlm_shader(attn_rows_kv32 attn_rows.comp KV_F32)
foreach(q q4 q8)
  string(TOUPPER ${q} Q)
  vkvlm_shader(attn_tiled_${q} attn_tiled.comp KV_${Q})
  vkvlm_shader(attn_rows_${q}_sg attn_rows.comp KV_${Q} USE_SUBGROUP)
  vkvlm_shader(attn_rows_${q} attn_rows.comp KV_${Q})
endforeach()
vkvlm_shader(attn_merge attn_merge.comp)

# Element-wise glue, gathers, conversions.
vkvlm_shader(unary unary.comp)
vkvlm_shader(binary binary.comp)
vkvlm_shader(convert_f32_f16 convert.comp SRC_F32 DST_F16)
vkvlm_shader(convert_f16_f32 convert.comp SRC_F16 DST_F32)
vkvlm_shader(convert_bf16_f32 convert.comp SRC_BF16 DST_F32)
vkvlm_shader(convert_f32_f32 convert.comp SRC_F32 DST_F32)
foreach(w f32 f16 bf16 q4 q8)
  string(TOUPPER ${w} W)
  vkvlm_shader(get_rows_${w} get_rows.comp W_${W})
endforeach()

# Vision.
vkvlm_shader(patch_embed patch_embed.comp)

# Logits.
vkvlm_shader(topk topk.comp)
vkvlm_shader(logsumexp_sg logsumexp.comp USE_SUBGROUP)
vkvlm_shader(logsumexp logsumexp.comp)
vkvlm_shader(repeat_penalty repeat_penalty.comp)

set(VKVLM_SHADER_SOURCE ${CMAKE_CURRENT_BINARY_DIR}/shaders_embedded.cpp)
add_custom_command(
  OUTPUT ${VKVLM_SHADER_SOURCE}
  COMMAND ${CMAKE_COMMAND} -DOUTPUT=${VKVLM_SHADER_SOURCE} "-DNAMES=${VKVLM_SHADER_NAMES}"
          -DDIR=${VKVLM_SPV_DIR} -P ${PROJECT_SOURCE_DIR}/cmake/EmbedShaders.cmake
  DEPENDS ${VKVLM_SHADER_SPVS} ${PROJECT_SOURCE_DIR}/cmake/EmbedShaders.cmake
  COMMENT "Embedding ${CMAKE_CURRENT_LIST_DIR} SPIR-V"
  VERBATIM)
add_custom_target(vkvlm_shaders DEPENDS ${VKVLM_SHADER_SOURCE})
