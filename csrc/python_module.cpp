// finepurify_ext._C is a Python module only so that `import` loads the library, whose static
// TORCH_LIBRARY blocks register the ops; the ops are reached through torch.ops.finepurify.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
