//! The OxTunnel steps of a relayed datagram: open what the previous hop sealed,
//! seal for the next hop. Payloads are rewritten in place; opened bytes are
//! staged in one scratch buffer allocated at start.

use crate::counters::Counters;
use crate::drop_reason::DropReason;
use crate::oxtunnel::{self, TunnelError, TunnelKey};

/// Room for one opened or to-be-sealed payload (a 4 KiB frame's worth).
const SCRATCH: usize = 4096;

/// A payload after the previous hop's tunnel, if any, was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The previous hop sent it plain: it is still in the payload.
    Plain,
    /// Opened into the scratch buffer: `len` bytes of the previous relay's flow `flow_id`.
    Inner { flow_id: u32, len: usize },
    /// A keepalive of flow `flow_id`: nothing to relay.
    Keepalive { flow_id: u32 },
}

impl Opened {
    /// The previous relay's flow id (0 from a plain hop).
    pub fn flow_id(self) -> u32 {
        match self {
            Opened::Plain => 0,
            Opened::Inner { flow_id, .. } | Opened::Keepalive { flow_id } => flow_id,
        }
    }
}

#[derive(Debug)]
pub struct TunnelSteps {
    scratch: Vec<u8>,
}

impl Default for TunnelSteps {
    fn default() -> Self {
        TunnelSteps { scratch: vec![0; SCRATCH] }
    }
}

impl TunnelSteps {
    /// Opens `payload` with the previous hop's `key`; without a key it is plain.
    pub fn open(&mut self, key: Option<&TunnelKey>, payload: &[u8]) -> Result<Opened, DropReason> {
        let Some(key) = key else { return Ok(Opened::Plain) };
        let inner = oxtunnel::open(key, payload, &mut self.scratch).map_err(TunnelError::drop_reason)?;
        Ok(if inner.keepalive {
            Opened::Keepalive { flow_id: inner.flow_id }
        } else {
            Opened::Inner { flow_id: inner.flow_id, len: inner.len }
        })
    }

    /// Writes the keepalive answer for `flow_id` over `payload`; returns its length.
    pub fn answer_keepalive(key: &TunnelKey, flow_id: u32, payload: &mut [u8]) -> Result<usize, DropReason> {
        Ok(oxtunnel::seal(key, flow_id, true, &[], payload).map_err(TunnelError::drop_reason)?.len)
    }

    /// Writes the outgoing payload of `len` bytes received: sealed with the next
    /// hop's `key` as flow `flow_id`, the opened bytes when only the previous hop
    /// was a tunnel, unchanged otherwise. Returns its length.
    pub fn pass_on(
        &mut self,
        key: Option<&TunnelKey>,
        flow_id: u32,
        opened: Opened,
        payload: &mut [u8],
        len: usize,
        counters: &Counters,
    ) -> Result<usize, DropReason> {
        let plain = match opened {
            Opened::Plain => None,
            Opened::Inner { len, .. } => Some(len),
            Opened::Keepalive { .. } => return Err(DropReason::TunnelMalformed),
        };
        match (key, plain) {
            (Some(key), _) => {
                let plain_len = match plain {
                    Some(n) => n,
                    None => {
                        let room = self.scratch.get_mut(..len).ok_or(DropReason::TunnelMalformed)?;
                        room.copy_from_slice(&payload[..len]);
                        len
                    }
                };
                let sealed = oxtunnel::seal(key, flow_id, false, &self.scratch[..plain_len], payload)
                    .map_err(TunnelError::drop_reason)?;
                counters.tunnel_bytes_saved.add((plain_len + oxtunnel::OVERHEAD).saturating_sub(sealed.len) as u64);
                Ok(sealed.len)
            }
            (None, Some(n)) => {
                payload.get_mut(..n).ok_or(DropReason::TunnelMalformed)?.copy_from_slice(&self.scratch[..n]);
                Ok(n)
            }
            (None, None) => Ok(len),
        }
    }
}
