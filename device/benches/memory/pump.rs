//! The guest side of the bench: keeps a fixed number of fenced `SUBMIT_3D`s
//! in flight on the control queue of the in-process frontend
//! ([`crate::common`]), re-posting each chain with the next fence id as
//! soon as the backend returns it. Each fence's stream is one `WRITE` of
//! its fence id into the slot of its chain, so the backend really touches
//! guest memory for every fence, as for fence-hammer's.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fencelab_device::protocol::*;
use fencelab_stream::Op;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::common::{self, AVAIL, DESC, Driver, QSIZE, SCRATCH, SCRATCH_LEN};

/// The context and resource the fences write through.
const CTX: u32 = 1;
const RESOURCE: u32 = 7;
/// Longest wait for the backend to return anything before calling it stuck.
const STALL: Duration = Duration::from_secs(10);

/// One chain, posted again and again.
struct Chain {
    /// Its slot in the resource: the `WRITE`s go to `slot * 8`.
    slot: u64,
    hdr_addr: u64,
    payload_addr: u64,
    resp_addr: u64,
    /// The fence it carries now.
    fence: u64,
}

pub struct Pump {
    drv: Driver,
    kick: EventFd,
    call: EventFd,
    chains: HashMap<u16, Chain>,
    avail_idx: u16,
    used_seen: u16,
    /// Fences to send in all.
    total: u64,
    posted: u64,
    completed: u64,
}

fn fence_hdr(fence: u64) -> CtrlHdr {
    CtrlHdr {
        type_: CMD_SUBMIT_3D,
        flags: VIRTIO_GPU_FLAG_FENCE,
        fence_id: fence,
        ctx_id: CTX,
        ..CtrlHdr::default()
    }
}

fn stream(slot: u64, fence: u64) -> Vec<u8> {
    fencelab_stream::encode(&[Op::Write {
        resource: RESOURCE,
        offset: slot * 8,
        value: fence,
    }])
}

impl Pump {
    /// Creates the context and its backed resource, then posts the first
    /// `in_flight` fences (of `total`) and kicks.
    pub fn start(
        mut drv: Driver,
        kick: EventFd,
        call: EventFd,
        in_flight: u16,
        total: u64,
    ) -> Result<Pump> {
        ensure!(
            u32::from(in_flight) * 3 + 8 <= u32::from(QSIZE)
                && u32::from(in_flight) * 8 <= SCRATCH_LEN,
            "{in_flight} chains in flight do not fit the test queue"
        );
        let used_seen = prepare(&mut drv, &kick)?;
        let mut pump = Pump {
            drv,
            kick,
            call,
            chains: HashMap::new(),
            avail_idx: 0,
            used_seen,
            total,
            posted: 0,
            completed: 0,
        };
        for slot in 0..u64::from(in_flight).min(total) {
            pump.post_new(slot);
        }
        pump.avail_idx = pump.drv.mem.read_obj(GuestAddress(AVAIL + 2))?;
        pump.kick.write(1).context("kick")?;
        Ok(pump)
    }

    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Posts a fresh chain for `slot` through the test driver and
    /// remembers where its parts are.
    fn post_new(&mut self, slot: u64) {
        self.posted += 1;
        let fence = self.posted;
        let payload = stream(slot, fence);
        let request = common::submit(fence_hdr(fence), &payload);
        let (head, resp_addr) = self.drv.post_chain(&[&request, &payload], 24);
        let desc = |i: u16| GuestAddress(DESC + u64::from(i) * 16);
        let read_u64 = |a: GuestAddress| self.drv.mem.read_obj::<u64>(a).unwrap();
        let hdr_addr = read_u64(desc(head));
        let next: u16 = self.drv.mem.read_obj(desc(head).unchecked_add(14)).unwrap();
        let payload_addr = read_u64(desc(next));
        let chain = Chain {
            slot,
            hdr_addr,
            payload_addr,
            resp_addr,
            fence,
        };
        self.chains.insert(head, chain);
    }

    /// Puts the chain at `head` back with the next fence id.
    fn repost(&mut self, head: u16) -> Result<()> {
        self.posted += 1;
        let fence = self.posted;
        let chain = self
            .chains
            .get_mut(&head)
            .with_context(|| format!("backend returned descriptor {head}, never posted"))?;
        chain.fence = fence;
        let mem = &self.drv.mem;
        mem.write_obj(fence_hdr(fence), GuestAddress(chain.hdr_addr))?;
        mem.write_slice(&stream(chain.slot, fence), GuestAddress(chain.payload_addr))?;
        let entry = AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        mem.write_obj(head, GuestAddress(entry))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))?;
        Ok(())
    }

    /// Runs until at least `target` fences (at most `total`) came back.
    pub fn run_to(&mut self, target: u64) -> Result<()> {
        let target = target.min(self.total);
        while self.completed < target {
            self.wait_call()?;
            let used = self.drv.used_idx();
            let mut reposted = false;
            while self.used_seen != used {
                let (head, len) = self.drv.used(self.used_seen);
                self.used_seen = self.used_seen.wrapping_add(1);
                self.take(head as u16, len)?;
                if self.posted < self.total {
                    self.repost(head as u16)?;
                    reposted = true;
                }
            }
            if reposted {
                self.kick.write(1).context("kick")?;
            }
        }
        Ok(())
    }

    /// Checks a returned chain's response.
    fn take(&mut self, head: u16, len: u32) -> Result<()> {
        let chain = self
            .chains
            .get(&head)
            .with_context(|| format!("backend returned descriptor {head}, never posted"))?;
        let resp = self.drv.resp_hdr(chain.resp_addr);
        if len < 24 || resp.type_ != RESP_OK_NODATA || resp.fence_id != chain.fence {
            bail!(
                "fence {} came back with {len} bytes written, response {:#x} for fence {}",
                chain.fence,
                resp.type_,
                resp.fence_id
            );
        }
        self.completed += 1;
        Ok(())
    }

    /// Blocks until the backend notifies (or [`STALL`] passes).
    fn wait_call(&self) -> Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, STALL.as_millis() as libc::c_int) };
        match n {
            1 => {
                self.call.read().context("read the call eventfd")?;
                Ok(())
            }
            0 => bail!(
                "no completion for {STALL:?}: {} of {} fences back, {} posted",
                self.completed,
                self.total,
                self.posted
            ),
            _ => Err(std::io::Error::last_os_error()).context("poll the call eventfd"),
        }
    }

    /// After the run: every fence came back and each chain's last `WRITE`
    /// is in guest memory.
    pub fn check_done(&self) -> Result<()> {
        ensure!(
            self.completed == self.total && self.posted == self.total,
            "{} fences posted, {} back, of {}",
            self.posted,
            self.completed,
            self.total
        );
        for chain in self.chains.values() {
            let at = GuestAddress(SCRATCH + chain.slot * 8);
            let seen: u64 = self.drv.mem.read_obj(at)?;
            ensure!(
                seen == chain.fence,
                "slot {} holds {seen}, its last fence {} wrote its id there",
                chain.slot,
                chain.fence
            );
        }
        Ok(())
    }
}

/// Creates context [`CTX`] and resource [`RESOURCE`] backed by the scratch
/// area and attached to the context, as a guest driver does before its
/// first submission. Returns how many used entries that took.
fn prepare(drv: &mut Driver, kick: &EventFd) -> Result<u16> {
    let hdr = |type_| CtrlHdr {
        type_,
        ctx_id: CTX,
        ..CtrlHdr::default()
    };
    let ctx = CtxCreate::default();
    let resource = ResourceId {
        resource_id: RESOURCE,
        padding: 0,
    };
    let post = |drv: &mut Driver, type_: u32, body: &[u8]| {
        (type_, drv.post(&[hdr(type_).as_slice(), body], 24))
    };
    let mut responses = vec![post(drv, CMD_CTX_CREATE, ctx.as_slice())];
    let [created, attached] = drv.post_backed_resource(RESOURCE);
    responses.push((CMD_RESOURCE_CREATE_2D, created));
    responses.push((CMD_RESOURCE_ATTACH_BACKING, attached));
    responses.push(post(drv, CMD_CTX_ATTACH_RESOURCE, resource.as_slice()));
    kick.write(1).context("kick")?;
    let n = responses.len() as u16;
    drv.wait_used(n);
    for (type_, resp) in responses {
        let got = drv.resp_hdr(resp).type_;
        ensure!(
            got == RESP_OK_NODATA,
            "{} answered {got:#x} during setup",
            type_name(type_)
        );
    }
    Ok(n)
}
