// finepurify_ext._C is a Python module mainly so that `import` loads the library, whose static
// TORCH_LIBRARY blocks register the ops; the ops are reached through torch.ops.finepurify.
#include <Python.h>

#include "cpu/kernels.h"

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(finepurify::cpu::capability());
}

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef FINEPURIFY_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS,
     "Whether the CUDA kernels were compiled into this build."},
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU kernels in use: 'avx2' or 'baseline' (FINEPURIFY_CPU_CAPABILITY=baseline forces it)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
