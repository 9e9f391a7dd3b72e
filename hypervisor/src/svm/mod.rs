//! AMD SVM backend (VMCB, NPT). See vmm::backend for the contract.
