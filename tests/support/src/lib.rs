//! Test support shared by the integration tests of several crates: where the tools of
//! `make setup` are, a single-node Garage S3 server, and kubectl with polling helpers.
//! Test infrastructure only: no product crate depends on it.

pub mod binaries;
pub mod garage;
pub mod kubectl;
pub mod process;
pub mod tools;

pub use garage::Garage;
pub use kubectl::{Kubectl, until};
pub use process::{log_to_test_output, run};
pub use tools::{tool, workspace};

/// Incompressible bytes without a random-number dependency.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A TCP port free on `ip` right now (the OS picks it; a race with another process taking
/// it before the caller binds is possible but rare).
pub fn free_port(ip: std::net::IpAddr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}
