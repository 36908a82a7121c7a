// finepurify_ext._C is a Python module mainly so that `import` loads the library, whose static
// TORCH_LIBRARY blocks register the ops; the ops are reached through torch.ops.finepurify.
#include <Python.h>

#include "cpu/kernels.h"
#include "finepurify/search.h"
#include "kernels/score_math.h"

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

// The constants the Python side of the threshold search shares with the kernels and the ops'
// own search (finepurify_ext/threshold.py checks its copies against these in the tests).
PyObject* constants(PyObject*, PyObject*) {
  using namespace finepurify;
  return Py_BuildValue("{s:(iii),s:L,s:L,s:L,s:L,s:L,s:I}", "level_bits", level_bits(0), level_bits(1),
                       level_bits(2), "between_bins", static_cast<long long>(kMaxBins), "candidate_counts",
                       static_cast<long long>(kCandidateCounts), "sample_run", static_cast<long long>(kSampleRun),
                       "candidate_keys", static_cast<long long>(kCandidateKeys), "sample_search_min_weights",
                       static_cast<long long>(kSampleSearchMinWeights), "inf_key", kInfBits);
}

// finepurify::keys_room, for the tests that compare it with threshold.keys_room.
PyObject* keys_room(PyObject*, PyObject* args) {
  double inside;
  long long samples, total, max_keys;
  if (!PyArg_ParseTuple(args, "dLLL", &inside, &samples, &total, &max_keys)) return nullptr;
  return PyLong_FromLongLong(finepurify::keys_room(inside, samples, total, max_keys));
}

// finepurify::sample_budget, for the tests that compare it with threshold.sample_budget.
PyObject* sample_budget(PyObject*, PyObject* args) {
  long long total;
  if (!PyArg_ParseTuple(args, "L", &total)) return nullptr;
  return PyLong_FromLongLong(finepurify::sample_budget(total));
}

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS,
     "Whether the CUDA kernels were compiled into this build."},
    {"constants", constants, METH_NOARGS,
     "The threshold search's constants as the C++ side has them: level bits, bins, counts, sample run, keys."},
    {"keys_room", keys_room, METH_VARARGS,
     "keys_room(inside, samples, total, max_keys): the keys a candidates pass of the ops' search may keep."},
    {"sample_budget", sample_budget, METH_VARARGS,
     "sample_budget(total): about how many weights the ops' search samples to bracket the threshold."},
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU kernels in use: 'avx2' or 'baseline' (FINEPURIFY_CPU_CAPABILITY=baseline forces it)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
