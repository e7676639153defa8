# Compiles one GLSL compute shader variant to validated, optimized SPIR-V.
# Invoked by the build as a script so that any failing step fails the build.
#   -DGLSLANG=... -DSPIRV_VAL=... -DSPIRV_OPT=... -DSOURCE=... -DOUTPUT=... -DDEFINES="A;B=1" -DINCLUDE_DIR=...
set(raw "${OUTPUT}.raw")
set(define_args "")
foreach(d IN LISTS DEFINES)
  list(APPEND define_args "-D${d}")
endforeach()
execute_process(
  COMMAND "${GLSLANG}" --target-env vulkan1.2 -V -I${INCLUDE_DIR} ${define_args} -o "${raw}" "${SOURCE}"
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "glslangValidator failed for ${SOURCE} [${DEFINES}]:\n${out}${err}")
endif()
execute_process(COMMAND "${SPIRV_VAL}" --target-env vulkan1.2 "${raw}"
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "spirv-val rejected ${SOURCE} [${DEFINES}]:\n${out}${err}")
endif()
execute_process(COMMAND "${SPIRV_OPT}" -O --target-env=vulkan1.2 "${raw}" -o "${OUTPUT}"
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "spirv-opt failed for ${SOURCE} [${DEFINES}]:\n${out}${err}")
endif()
execute_process(COMMAND "${SPIRV_VAL}" --target-env vulkan1.2 "${OUTPUT}"
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "spirv-val rejected the optimized ${SOURCE} [${DEFINES}]:\n${out}${err}")
endif()
file(REMOVE "${raw}")
