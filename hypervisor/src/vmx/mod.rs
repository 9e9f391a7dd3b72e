//! Intel VMX backend (VMCS, EPT). See vmm::backend for the contract.
