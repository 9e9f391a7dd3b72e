//! The machine around Vireo: how to stop it.

pub mod exit;
