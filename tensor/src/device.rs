//! Where a tensor's buffer lives.

/// A compute device. `Cuda(n)` names the n-th GPU; its kernels arrive with the CUDA
/// backend, and until then creating a tensor there returns
/// [`Error::DeviceUnavailable`](crate::Error::DeviceUnavailable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Returns the device if tensors can be created on it in this build.
    pub fn check_available(self) -> crate::Result<Self> {
        match self {
            Device::Cpu => Ok(self),
            Device::Cuda(_) => Err(crate::Error::DeviceUnavailable {
                device: self,
                reason: "this build of aigc-tensor has no CUDA backend yet".into(),
            }),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}
