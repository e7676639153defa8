# Runs one pytest file with the test virtual environment's Python; a missing environment is a
# failure that says how to make it. Usage: cmake -DPYTHON=... -DSCRIPT=... -P run_pytest.cmake
if(NOT EXISTS "${PYTHON}")
  message(FATAL_ERROR "no test environment at ${PYTHON}: run `scripts/setup --tests` first")
endif()
execute_process(COMMAND "${PYTHON}" -m pytest -v -p no:cacheprovider "${SCRIPT}" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "pytest ${SCRIPT}: exit status ${rc}")
endif()
