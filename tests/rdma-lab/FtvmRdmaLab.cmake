# RDMA test lab for CTest: runs built programs inside a QEMU guest with a real Soft-RoCE device
# (tests/rdma-lab/lab.sh, two-hosts.sh). include() this file from any CMakeLists.txt (it is
# included by tests/rdma-lab/CMakeLists.txt; including it again is a no-op), then:
#
#   ftvm_rdma_lab_test(NAME <test>
#                      COMMAND <program> [args...]          # one guest, rxe0 in loopback
#                    | SERVER <shell cmd> CLIENT <shell cmd> # two guests joined by UDP, one rxe0 each
#                      [FILES <target-or-path>...]   # copied to /lab in the guest (+ their libraries)
#                      [ENV VAR=VALUE...] [LABELS <label>...] [TIMEOUT <seconds, default 300>]
#                      [CPUS <n, default 1>] [MEMORY <size, default 512M>])
#
# COMMAND runs in /lab (PATH has /lab first) with RXE_DEV=rxe0, GID_IDX, LAB_IP, LAB_PEER_IP set;
# arguments reach it verbatim (a Catch2 filter such as "[rdma]" is safe). FILES that are CMake
# targets are built by the lab fixture, so `ctest -L rdma` works right after `cmake`.
# Every test gets LABELS rdma, RUN_SERIAL, FIXTURES_REQUIRED ftvm_rdma_lab; the fixture test
# rdma_lab_base builds the guest kernel (target guest-image), the lab base (target rdma-lab) and
# the FILES targets (target rdma-lab-tests). Without rdma-core on the host, each test is still
# registered and fails, telling to install rdma-core (scripts/install-deps.sh).
include_guard(GLOBAL)

set(FTVM_RDMA_LAB_SOURCE_DIR ${CMAKE_CURRENT_LIST_DIR} CACHE INTERNAL "RDMA lab sources")
if(NOT DEFINED FTVM_GUEST_DIR)
  set(FTVM_GUEST_DIR ${CMAKE_BINARY_DIR}/guest)
endif()
set(FTVM_RDMA_LAB_DIR ${CMAKE_BINARY_DIR}/rdma-lab CACHE INTERNAL "RDMA test lab directory")

# ---- host prerequisites: rdma-core headers/libraries (to build) and its rxe provider (for the lab)
find_package(PkgConfig QUIET)
if(PkgConfig_FOUND)
  pkg_check_modules(FTVM_RDMA QUIET IMPORTED_TARGET GLOBAL librdmacm libibverbs)
endif()
file(GLOB _ftvm_rxe_provider /usr/lib/*-linux-gnu/libibverbs/librxe-rdmav*.so)
find_program(FTVM_RDMA_TOOL NAMES rdma PATHS /usr/bin /usr/sbin /sbin NO_DEFAULT_PATH)
set(FTVM_RDMA_LAB_MISSING "")
if(NOT FTVM_RDMA_FOUND)
  list(APPEND FTVM_RDMA_LAB_MISSING "librdmacm/libibverbs development files (pkg-config librdmacm libibverbs)")
endif()
if(NOT _ftvm_rxe_provider OR NOT EXISTS /etc/libibverbs.d/rxe.driver)
  list(APPEND FTVM_RDMA_LAB_MISSING "the rxe verbs provider (ibverbs-providers)")
endif()
if(NOT FTVM_RDMA_TOOL)
  list(APPEND FTVM_RDMA_LAB_MISSING "the rdma tool (iproute2)")
endif()
# Global (cache) so ftvm_rdma_lab_test() works from any directory after this file was included.
set(FTVM_RDMA_LAB_MISSING "${FTVM_RDMA_LAB_MISSING}" CACHE INTERNAL "RDMA lab prerequisites missing")
if(FTVM_RDMA_LAB_MISSING)
  set(FTVM_RDMA_LAB_AVAILABLE OFF CACHE INTERNAL "RDMA lab usable")
  list(JOIN FTVM_RDMA_LAB_MISSING ", " _missing)
  message(WARNING "RDMA lab: missing ${_missing}. The RDMA tests (ctest -L rdma) are registered "
                  "but FAIL until you install rdma-core (scripts/install-deps.sh) and re-run cmake.")
else()
  set(FTVM_RDMA_LAB_AVAILABLE ON CACHE INTERNAL "RDMA lab usable")
  message(STATUS "RDMA lab: librdmacm ${FTVM_RDMA_librdmacm_VERSION}, libibverbs "
                 "${FTVM_RDMA_libibverbs_VERSION}; tests run in a Soft-RoCE guest (ctest -L rdma)")
endif()

if(FTVM_RDMA_LAB_AVAILABLE)
  # The lab base: guest kernel (tests/guest) + rdma modules + rdma-core userspace. build-lab.sh
  # skips the work when its stamp matches, so this target is cheap to run every time.
  add_custom_target(rdma-lab
    COMMAND ${CMAKE_COMMAND} -E make_directory ${FTVM_RDMA_LAB_DIR}
    COMMAND flock ${FTVM_RDMA_LAB_DIR}/.build.lock
            ${FTVM_RDMA_LAB_SOURCE_DIR}/build-lab.sh -g ${FTVM_GUEST_DIR} ${FTVM_RDMA_LAB_DIR}
    COMMENT "RDMA lab base in ${FTVM_RDMA_LAB_DIR}"
    USES_TERMINAL
    VERBATIM)
  add_dependencies(rdma-lab guest-image)
  # Everything the lab tests need; ftvm_rdma_lab_test() adds the FILES targets.
  add_custom_target(rdma-lab-tests)
  add_dependencies(rdma-lab-tests rdma-lab)
  add_test(NAME rdma_lab_base
           COMMAND ${CMAKE_COMMAND} --build ${CMAKE_BINARY_DIR} --target rdma-lab-tests)
  set_tests_properties(rdma_lab_base PROPERTIES
    FIXTURES_SETUP ftvm_rdma_lab LABELS rdma RUN_SERIAL ON TIMEOUT 1800)
endif()

function(ftvm_rdma_lab_test)
  cmake_parse_arguments(PARSE_ARGV 0 A "" "NAME;TIMEOUT;CPUS;MEMORY;SERVER;CLIENT" "COMMAND;FILES;ENV;LABELS")
  if(NOT A_NAME)
    message(FATAL_ERROR "ftvm_rdma_lab_test: NAME is required")
  endif()
  if(A_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "ftvm_rdma_lab_test(${A_NAME}): unexpected arguments ${A_UNPARSED_ARGUMENTS}")
  endif()
  if(A_COMMAND AND (A_SERVER OR A_CLIENT))
    message(FATAL_ERROR "ftvm_rdma_lab_test(${A_NAME}): give COMMAND or SERVER+CLIENT, not both")
  endif()
  if(NOT A_COMMAND AND NOT (A_SERVER AND A_CLIENT))
    message(FATAL_ERROR "ftvm_rdma_lab_test(${A_NAME}): COMMAND or SERVER+CLIENT is required")
  endif()
  if(NOT A_TIMEOUT)
    set(A_TIMEOUT 300)
  endif()
  if(NOT A_CPUS)
    set(A_CPUS 1)
  endif()
  if(NOT A_MEMORY)
    set(A_MEMORY 512M)
  endif()

  if(NOT FTVM_RDMA_LAB_AVAILABLE)
    list(JOIN FTVM_RDMA_LAB_MISSING ", " _missing)
    add_test(NAME ${A_NAME} COMMAND sh -c "echo \"RDMA lab unavailable: missing $1. install rdma-core (scripts/install-deps.sh), then re-run cmake\" >&2; exit 1" sh "${_missing}")
    set_tests_properties(${A_NAME} PROPERTIES LABELS "rdma;${A_LABELS}")
    return()
  endif()

  # The guests' own timeout ends the run (exit 124, QEMU killed) before CTest's does.
  if(A_TIMEOUT LESS 60)
    message(FATAL_ERROR "ftvm_rdma_lab_test(${A_NAME}): TIMEOUT ${A_TIMEOUT} is too short for a guest boot")
  endif()
  math(EXPR _guest_tmo "${A_TIMEOUT} - 30")
  # lab.sh builds nothing here (-B): the fixture did
  set(_opts -B -d ${FTVM_RDMA_LAB_DIR} -t ${_guest_tmo})
  set(_log ${CMAKE_CURRENT_BINARY_DIR}/rdma-lab-logs/${A_NAME})
  foreach(f IN LISTS A_FILES)
    if(TARGET ${f})
      list(APPEND _opts -a $<TARGET_FILE:${f}>)
      add_dependencies(rdma-lab-tests ${f})
    else()
      get_filename_component(f ${f} ABSOLUTE BASE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
      list(APPEND _opts -a ${f})
    endif()
  endforeach()
  foreach(e IN LISTS A_ENV)
    list(APPEND _opts -e ${e})
  endforeach()

  if(A_COMMAND)
    add_test(NAME ${A_NAME} COMMAND ${FTVM_RDMA_LAB_SOURCE_DIR}/lab.sh -q ${_opts} -l ${_log}.log
             -c ${A_CPUS} -m ${A_MEMORY} -- ${A_COMMAND})
  else()
    if(NOT A_CPUS EQUAL 1 OR NOT A_MEMORY STREQUAL "512M")
      message(WARNING "ftvm_rdma_lab_test(${A_NAME}): CPUS/MEMORY apply to one-guest tests only")
    endif()
    add_test(NAME ${A_NAME} COMMAND ${FTVM_RDMA_LAB_SOURCE_DIR}/two-hosts.sh ${_opts} -l ${_log} -g 10
             -s ${A_SERVER} -c ${A_CLIENT})
  endif()
  set_tests_properties(${A_NAME} PROPERTIES
    LABELS "rdma;${A_LABELS}" FIXTURES_REQUIRED ftvm_rdma_lab RUN_SERIAL ON TIMEOUT ${A_TIMEOUT})
endfunction()
