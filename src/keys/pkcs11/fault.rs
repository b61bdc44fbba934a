//! Test-only faults of the PKCS#11 provider, compiled in only with the cargo feature
//! `fault-injection`: [`set_hsm_stall`] and [`set_hsm_down`] make every token operation of
//! this process hang for a while or fail as a device error would. SoftHSM is a library inside
//! the process, so a network HSM that hangs or goes away cannot be produced with it otherwise.
//! The real token still does the work whenever no fault is set.

#[cfg(feature = "fault-injection")]
static HSM_STALL_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
#[cfg(feature = "fault-injection")]
static HSM_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Make every PKCS#11 token operation started from now on block for `stall` before it runs
/// (zero: no stall). Feature `fault-injection` only.
#[cfg(feature = "fault-injection")]
pub fn set_hsm_stall(stall: std::time::Duration) {
    let ms = u64::try_from(stall.as_millis()).unwrap_or(u64::MAX);
    HSM_STALL_MS.store(ms, std::sync::atomic::Ordering::SeqCst);
}

/// Make every PKCS#11 token operation fail as with `CKR_DEVICE_ERROR` while `down`.
/// Feature `fault-injection` only.
#[cfg(feature = "fault-injection")]
pub fn set_hsm_down(down: bool) {
    HSM_DOWN.store(down, std::sync::atomic::Ordering::SeqCst);
}

/// Called on the blocking thread before each token operation: stalls, and returns the error
/// to fail with while the HSM is "down".
#[cfg(feature = "fault-injection")]
pub(crate) fn hsm_fault() -> Option<super::Pkcs11Error> {
    use std::sync::atomic::Ordering;
    let stall = HSM_STALL_MS.load(Ordering::SeqCst);
    if stall > 0 {
        std::thread::sleep(std::time::Duration::from_millis(stall));
    }
    HSM_DOWN
        .load(Ordering::SeqCst)
        .then(|| super::Pkcs11Error::Call {
            op: "C_Decrypt",
            source: std::sync::Arc::new(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::DeviceError,
                cryptoki::context::Function::Decrypt,
            )),
        })
}

/// Without the feature there is no HSM fault.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn hsm_fault() -> Option<super::Pkcs11Error> {
    None
}
