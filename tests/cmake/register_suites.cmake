# Run after a test executable is built (cmake -P): lists its tests and writes one CTest test per
# GoogleTest suite, `Suite` running `exe --gtest_filter=Suite.*`.
#
# One process per suite instead of one per test case: every process of a CUDA build pays about
# 0.25 s to map cuBLAS (a 600 MB library) before main, which was more than half of the whole
# suite's CPU time on a two-core CI machine with one process per case (1136 cases, 208 suites).
#
# Inputs (-D): EXE (the executable), NAME (its target name, the tests' prefix: `NAME:Suite`, since
# two executables may hold suites of one name), OUT (the file to write), LABEL, WORKDIR, HEAVY (suites
# known to run long, comma-separated: a high COST, so that ctest -j starts them first on a fresh machine).
# A suite whose every test skipped exits with 77 (tests/test_main.cpp): SKIP_RETURN_CODE.
cmake_minimum_required(VERSION 3.20)

execute_process(COMMAND "${EXE}" --gtest_list_tests
                OUTPUT_VARIABLE listing ERROR_VARIABLE errors RESULT_VARIABLE rc TIMEOUT 60)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "register_suites: '${EXE} --gtest_list_tests' failed (${rc}): ${errors}")
endif()

string(REPLACE "," ";" HEAVY "${HEAVY}")
set(script "")
string(REPLACE "\n" ";" lines "${listing}")
foreach(line IN LISTS lines)
  # Suite lines start in column 0 and end with '.', optionally followed by "  # TypeParam = ...".
  if(line MATCHES "^([^ #][^ ]*)\\.( |$)")
    set(suite "${CMAKE_MATCH_1}")
    set(cost 1)
    if(suite IN_LIST HEAVY)
      set(cost 100)
    endif()
    string(APPEND script
      "add_test([==[${NAME}:${suite}]==] [==[${EXE}]==] [==[--gtest_filter=${suite}.*]==])\n"
      "set_tests_properties([==[${NAME}:${suite}]==] PROPERTIES LABELS [==[${LABEL}]==]"
      " WORKING_DIRECTORY [==[${WORKDIR}]==] SKIP_RETURN_CODE 77 COST ${cost})\n")
  endif()
endforeach()
file(WRITE "${OUT}" "${script}")
