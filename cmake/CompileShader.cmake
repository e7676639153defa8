# Compiles one GLSL compute shader variant to validated, optimized SPIR-V.
# Invoked by the build as a script so that any failing step fails the build.
#   -DGLSLANG=... -DSPIRV_VAL=... -DSPIRV_OPT=... -DSOURCE=... -DOUTPUT=... -DDEFINES="A;B=1" -DINCLUDE_DIR=...
set(raw "${OUTPUT}.raw")
set(define_args "")
foreach(d IN LISTS DEFINES)
  list(APPEND define_args "-D${d}")
endforeach()
# Runs one step; any failure stops the build with the tool's output.
function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} ${SOURCE} [${DEFINES}]:\n${out}${err}")
  endif()
endfunction()

run_step("glslangValidator failed for" "${GLSLANG}" --target-env vulkan1.2 -V -I${INCLUDE_DIR} ${define_args} -o "${raw}" "${SOURCE}")
run_step("spirv-val rejected" "${SPIRV_VAL}" --target-env vulkan1.2 "${raw}")
run_step("spirv-opt failed for" "${SPIRV_OPT}" -O --target-env=vulkan1.2 "${raw}" -o "${OUTPUT}")
run_step("spirv-val rejected the optimized" "${SPIRV_VAL}" --target-env vulkan1.2 "${OUTPUT}")
file(REMOVE "${raw}")
