# The files the extension packages, found by globbing so that a new library module or
# resource is never left out. Used by L3MuscleSeg/CMakeLists.txt, and run with `cmake -P`
# by tests/test_slicer_packaging.py, so the test checks the very lists the build uses.
#
# Outputs (lists):
#   module_scripts_var  *.py of the module folder, relative to ROOT/L3MuscleSeg
#   lib_scripts_var     *.py under ROOT/L3MuscleSegLib, relative to ROOT
#   resources_var       every other file under ROOT/L3MuscleSegLib and ROOT/Resources,
#                       relative to ROOT (model files, .ui, icons)
function(l3muscleseg_packaged_files root module_scripts_var lib_scripts_var resources_var)
  set(depends_option)
  if(NOT CMAKE_SCRIPT_MODE_FILE)
    set(depends_option CONFIGURE_DEPENDS)  # re-glob when files are added or removed
  endif()

  file(GLOB module_scripts LIST_DIRECTORIES false RELATIVE "${root}/L3MuscleSeg"
    ${depends_option} "${root}/L3MuscleSeg/*.py")
  file(GLOB_RECURSE packaged LIST_DIRECTORIES false RELATIVE "${root}"
    ${depends_option} "${root}/L3MuscleSegLib/*" "${root}/Resources/*")
  list(FILTER packaged EXCLUDE REGEX "(^|/)__pycache__/|\\.py[co]$")

  set(lib_scripts ${packaged})
  list(FILTER lib_scripts INCLUDE REGEX "\\.py$")
  set(resources ${packaged})
  list(FILTER resources EXCLUDE REGEX "\\.py$")

  list(SORT module_scripts)
  list(SORT lib_scripts)
  list(SORT resources)
  set(${module_scripts_var} ${module_scripts} PARENT_SCOPE)
  set(${lib_scripts_var} ${lib_scripts} PARENT_SCOPE)
  set(${resources_var} ${resources} PARENT_SCOPE)
endfunction()
