//! Graphite's plaintext protocol over TCP: `path value timestamp\n`, current values.
//!
//! One connection is kept between pushes (carbon-cache takes any number of lines on it) and made
//! again after an error. A peer that closed the connection is noticed before writing (a read
//! that returns end-of-file), not after the next batch went into a dead socket's buffer.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::names::{dotted, number};
use super::net::resolve;
use super::spec::PushSpec;
use super::Batch;

/// The lines of a batch, with the batch's timestamp (whole seconds).
pub fn payload(batch: &Batch, spec: &PushSpec) -> Vec<u8> {
    let ts = batch.at as u64;
    let mut out = String::with_capacity(batch.points.len() * 48);
    for p in &batch.points {
        let Some(v) = number(p.sample.value) else { continue };
        out.push_str(&dotted(spec.prefix.as_deref(), &p.sample, spec.labels));
        out.push(' ');
        out.push_str(&v);
        out.push(' ');
        out.push_str(&ts.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// The connection to carbon, kept between pushes.
#[derive(Default)]
pub struct Conn {
    stream: Option<TcpStream>,
}

impl Conn {
    /// Writes a payload, connecting first if there is no live connection.
    pub async fn send(&mut self, spec: &PushSpec, payload: &[u8]) -> Result<(), String> {
        if let Some(s) = &self.stream {
            let mut buf = [0u8; 256];
            let gone = match s.try_read(&mut buf) {
                Ok(0) => true,
                // carbon never writes; whatever it is, the connection is alive.
                Ok(_) => false,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
            if gone {
                self.stream = None;
            }
        }
        if self.stream.is_none() {
            let to = resolve(&spec.address).await?;
            let s = TcpStream::connect(to).await.map_err(|e| format!("connecting to {to}: {e}"))?;
            let _ = s.set_nodelay(true);
            self.stream = Some(s);
        }
        let Some(s) = self.stream.as_mut() else { return Err("no connection".into()) };
        if let Err(e) = s.write_all(payload).await {
            self.stream = None;
            return Err(format!("writing to {}: {e}", spec.address));
        }
        Ok(())
    }
}
