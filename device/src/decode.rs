//! Request bytes -> typed [`Command`].
//!
//! Pure functions over a byte slice: the backend gathers a descriptor
//! chain's readable part into one buffer and hands it here, so everything
//! about the wire format (and everything a malicious guest can do to it) is
//! testable without guest memory or vrings. Every failure is a
//! [`DecodeError`] that names what was wrong; nothing panics.

use thiserror::Error;

use crate::protocol::*;

/// Most memory entries one `RESOURCE_ATTACH_BACKING` may carry (QEMU's limit).
pub const MAX_MEM_ENTRIES: u32 = 16384;

/// A decoded control- or cursor-queue request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    GetDisplayInfo,
    GetEdid {
        scanout: u32,
    },
    GetCapsetInfo {
        index: u32,
    },
    GetCapset {
        id: u32,
        version: u32,
    },
    ResourceCreate2d(ResourceCreate2d),
    ResourceUnref {
        resource_id: u32,
    },
    SetScanout(SetScanout),
    ResourceFlush(ResourceFlush),
    TransferToHost2d(TransferToHost2d),
    ResourceAttachBacking {
        resource_id: u32,
        entries: Vec<MemEntry>,
    },
    ResourceDetachBacking {
        resource_id: u32,
    },
    CtxCreate {
        context_init: u32,
        debug_name: String,
    },
    CtxDestroy,
    CtxAttachResource {
        resource_id: u32,
    },
    CtxDetachResource {
        resource_id: u32,
    },
    ResourceCreate3d(ResourceCreate3d),
    TransferToHost3d(TransferHost3d),
    TransferFromHost3d(TransferHost3d),
    Submit3d {
        payload: Vec<u8>,
    },
    UpdateCursor(UpdateCursor),
    MoveCursor(UpdateCursor),
}

impl Command {
    /// The wire type this command was decoded from.
    pub fn type_code(&self) -> u32 {
        match self {
            Command::GetDisplayInfo => CMD_GET_DISPLAY_INFO,
            Command::GetEdid { .. } => CMD_GET_EDID,
            Command::GetCapsetInfo { .. } => CMD_GET_CAPSET_INFO,
            Command::GetCapset { .. } => CMD_GET_CAPSET,
            Command::ResourceCreate2d(_) => CMD_RESOURCE_CREATE_2D,
            Command::ResourceUnref { .. } => CMD_RESOURCE_UNREF,
            Command::SetScanout(_) => CMD_SET_SCANOUT,
            Command::ResourceFlush(_) => CMD_RESOURCE_FLUSH,
            Command::TransferToHost2d(_) => CMD_TRANSFER_TO_HOST_2D,
            Command::ResourceAttachBacking { .. } => CMD_RESOURCE_ATTACH_BACKING,
            Command::ResourceDetachBacking { .. } => CMD_RESOURCE_DETACH_BACKING,
            Command::CtxCreate { .. } => CMD_CTX_CREATE,
            Command::CtxDestroy => CMD_CTX_DESTROY,
            Command::CtxAttachResource { .. } => CMD_CTX_ATTACH_RESOURCE,
            Command::CtxDetachResource { .. } => CMD_CTX_DETACH_RESOURCE,
            Command::ResourceCreate3d(_) => CMD_RESOURCE_CREATE_3D,
            Command::TransferToHost3d(_) => CMD_TRANSFER_TO_HOST_3D,
            Command::TransferFromHost3d(_) => CMD_TRANSFER_FROM_HOST_3D,
            Command::Submit3d { .. } => CMD_SUBMIT_3D,
            Command::UpdateCursor(_) => CMD_UPDATE_CURSOR,
            Command::MoveCursor(_) => CMD_MOVE_CURSOR,
        }
    }

    /// Name for logs and stats.
    pub fn name(&self) -> &'static str {
        type_name(self.type_code())
    }
}

/// Why a request could not be decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("request of {len} bytes is shorter than the 24-byte virtio_gpu_ctrl_hdr")]
    ShortHeader { len: usize },
    #[error("unknown command type {0:#x}")]
    UnknownType(u32),
    #[error("command {} ({:#x}) is not supported by this device", type_name(*.0), .0)]
    Unsupported(u32),
    #[error("{cmd}: body is {have} bytes, needs {need}")]
    ShortBody {
        cmd: &'static str,
        need: usize,
        have: usize,
    },
    #[error("{cmd}: resource id 0 is reserved")]
    ZeroResourceId { cmd: &'static str },
    #[error("RESOURCE_ATTACH_BACKING: {nr} entries, at most {MAX_MEM_ENTRIES} allowed")]
    TooManyEntries { nr: u32 },
    #[error("RESOURCE_ATTACH_BACKING: {nr} entries need {need} bytes, request has {have}")]
    EntriesTruncated { nr: u32, need: usize, have: usize },
    #[error("SUBMIT_3D: header says {size} payload bytes, request has {have}")]
    SubmitSize { size: u32, have: usize },
    #[error("CTX_CREATE: debug name length {nlen} exceeds 64")]
    NameTooLong { nlen: u32 },
}

impl DecodeError {
    /// The `VIRTIO_GPU_RESP_ERR_*` a request failing this way is answered with.
    ///
    /// Unknown or unsupported commands and requests too short for their own
    /// struct get `ERR_UNSPEC` (as QEMU answers them); requests whose fields
    /// are well-formed but carry impossible values get the specific code.
    pub fn response_code(&self) -> u32 {
        match self {
            DecodeError::ShortHeader { .. }
            | DecodeError::UnknownType(_)
            | DecodeError::Unsupported(_)
            | DecodeError::ShortBody { .. } => RESP_ERR_UNSPEC,
            DecodeError::ZeroResourceId { .. } => RESP_ERR_INVALID_RESOURCE_ID,
            DecodeError::TooManyEntries { .. }
            | DecodeError::EntriesTruncated { .. }
            | DecodeError::SubmitSize { .. }
            | DecodeError::NameTooLong { .. } => RESP_ERR_INVALID_PARAMETER,
        }
    }
}

/// Splits a request into its header and the bytes after it.
pub fn decode_header(bytes: &[u8]) -> Result<(CtrlHdr, &[u8]), DecodeError> {
    let hdr: CtrlHdr = read_struct(bytes).ok_or(DecodeError::ShortHeader { len: bytes.len() })?;
    let body = bytes.get(std::mem::size_of::<CtrlHdr>()..).unwrap_or(&[]);
    Ok((hdr, body))
}

/// Decodes the body of a request whose header is `hdr`.
///
/// Bytes past the end of a fixed-size body are ignored, as they are by QEMU:
/// drivers may pad.
pub fn decode_command(hdr: &CtrlHdr, body: &[u8]) -> Result<Command, DecodeError> {
    let ty = hdr.type_;
    let cmd = type_name(ty);
    // Read a fixed struct, reporting its size when the body is too short.
    macro_rules! body {
        ($t:ty) => {{
            read_struct::<$t>(body).ok_or(DecodeError::ShortBody {
                cmd,
                need: std::mem::size_of::<$t>(),
                have: body.len(),
            })?
        }};
    }
    let nonzero = |resource_id: u32| -> Result<u32, DecodeError> {
        if resource_id == 0 {
            Err(DecodeError::ZeroResourceId { cmd })
        } else {
            Ok(resource_id)
        }
    };

    Ok(match ty {
        CMD_GET_DISPLAY_INFO => Command::GetDisplayInfo,
        CMD_GET_EDID => Command::GetEdid {
            scanout: body!(GetEdid).scanout,
        },
        CMD_GET_CAPSET_INFO => Command::GetCapsetInfo {
            index: body!(GetCapsetInfo).capset_index,
        },
        CMD_GET_CAPSET => {
            let b = body!(GetCapset);
            Command::GetCapset {
                id: b.capset_id,
                version: b.capset_version,
            }
        }
        CMD_RESOURCE_CREATE_2D => {
            let b = body!(ResourceCreate2d);
            nonzero(b.resource_id)?;
            Command::ResourceCreate2d(b)
        }
        CMD_RESOURCE_UNREF => Command::ResourceUnref {
            resource_id: nonzero(body!(ResourceId).resource_id)?,
        },
        // Resource 0 is legal here: it disables the scanout.
        CMD_SET_SCANOUT => Command::SetScanout(body!(SetScanout)),
        CMD_RESOURCE_FLUSH => {
            let b = body!(ResourceFlush);
            nonzero(b.resource_id)?;
            Command::ResourceFlush(b)
        }
        CMD_TRANSFER_TO_HOST_2D => {
            let b = body!(TransferToHost2d);
            nonzero(b.resource_id)?;
            Command::TransferToHost2d(b)
        }
        CMD_RESOURCE_ATTACH_BACKING => {
            let b = body!(ResourceAttachBacking);
            nonzero(b.resource_id)?;
            if b.nr_entries > MAX_MEM_ENTRIES {
                return Err(DecodeError::TooManyEntries { nr: b.nr_entries });
            }
            let head = std::mem::size_of::<ResourceAttachBacking>();
            let entry = std::mem::size_of::<MemEntry>();
            // nr_entries <= MAX_MEM_ENTRIES, so this cannot overflow; checked anyway.
            let need = (b.nr_entries as usize)
                .checked_mul(entry)
                .and_then(|n| n.checked_add(head))
                .ok_or(DecodeError::TooManyEntries { nr: b.nr_entries })?;
            let rest = body.get(head..need).ok_or(DecodeError::EntriesTruncated {
                nr: b.nr_entries,
                need,
                have: body.len(),
            })?;
            let entries = rest
                .chunks_exact(entry)
                .filter_map(read_struct::<MemEntry>)
                .collect();
            Command::ResourceAttachBacking {
                resource_id: b.resource_id,
                entries,
            }
        }
        CMD_RESOURCE_DETACH_BACKING => Command::ResourceDetachBacking {
            resource_id: nonzero(body!(ResourceId).resource_id)?,
        },
        CMD_CTX_CREATE => {
            let b = body!(CtxCreate);
            if b.nlen > 64 {
                return Err(DecodeError::NameTooLong { nlen: b.nlen });
            }
            let name = b.debug_name.get(..b.nlen as usize).unwrap_or(&[]);
            Command::CtxCreate {
                context_init: b.context_init,
                debug_name: String::from_utf8_lossy(name).into_owned(),
            }
        }
        CMD_CTX_DESTROY => Command::CtxDestroy,
        CMD_CTX_ATTACH_RESOURCE => Command::CtxAttachResource {
            resource_id: nonzero(body!(ResourceId).resource_id)?,
        },
        CMD_CTX_DETACH_RESOURCE => Command::CtxDetachResource {
            resource_id: nonzero(body!(ResourceId).resource_id)?,
        },
        CMD_RESOURCE_CREATE_3D => {
            let b = body!(ResourceCreate3d);
            nonzero(b.resource_id)?;
            Command::ResourceCreate3d(b)
        }
        CMD_TRANSFER_TO_HOST_3D => {
            let b = body!(TransferHost3d);
            nonzero(b.resource_id)?;
            Command::TransferToHost3d(b)
        }
        CMD_TRANSFER_FROM_HOST_3D => {
            let b = body!(TransferHost3d);
            nonzero(b.resource_id)?;
            Command::TransferFromHost3d(b)
        }
        CMD_SUBMIT_3D => {
            let b = body!(CmdSubmit);
            let rest = body.get(std::mem::size_of::<CmdSubmit>()..).unwrap_or(&[]);
            let payload = rest.get(..b.size as usize).ok_or(DecodeError::SubmitSize {
                size: b.size,
                have: rest.len(),
            })?;
            Command::Submit3d {
                payload: payload.to_vec(),
            }
        }
        // Resource 0 hides the cursor.
        CMD_UPDATE_CURSOR => Command::UpdateCursor(body!(UpdateCursor)),
        CMD_MOVE_CURSOR => Command::MoveCursor(body!(UpdateCursor)),
        CMD_RESOURCE_ASSIGN_UUID
        | CMD_RESOURCE_CREATE_BLOB
        | CMD_SET_SCANOUT_BLOB
        | CMD_RESOURCE_MAP_BLOB
        | CMD_RESOURCE_UNMAP_BLOB => return Err(DecodeError::Unsupported(ty)),
        _ => return Err(DecodeError::UnknownType(ty)),
    })
}

/// Decodes a complete request. On failure the header is returned too when it
/// could be read, so the error response can still carry the fence.
pub fn decode(bytes: &[u8]) -> Result<(CtrlHdr, Command), (Option<CtrlHdr>, DecodeError)> {
    let (hdr, body) = decode_header(bytes).map_err(|e| (None, e))?;
    let cmd = decode_command(&hdr, body).map_err(|e| (Some(hdr), e))?;
    Ok((hdr, cmd))
}

/// Request builders shared by the unit tests of several modules.
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use vm_memory::ByteValued;

    pub fn hdr(ty: u32) -> CtrlHdr {
        CtrlHdr {
            type_: ty,
            ..CtrlHdr::default()
        }
    }

    pub fn fenced(ty: u32, ctx_id: u32, fence_id: u64) -> CtrlHdr {
        CtrlHdr {
            type_: ty,
            flags: VIRTIO_GPU_FLAG_FENCE,
            fence_id,
            ctx_id,
            ..CtrlHdr::default()
        }
    }

    /// Header followed by each part's bytes.
    pub fn req(h: CtrlHdr, parts: &[&[u8]]) -> Vec<u8> {
        let mut v = h.as_slice().to_vec();
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    }

    pub fn submit(h: CtrlHdr, payload: &[u8]) -> Vec<u8> {
        let size = u32::try_from(payload.len()).unwrap();
        let b = CmdSubmit { size, padding: 0 };
        req(h, &[b.as_slice(), payload])
    }

    pub fn attach(resource_id: u32, entries: &[MemEntry]) -> Vec<u8> {
        let b = ResourceAttachBacking {
            resource_id,
            nr_entries: u32::try_from(entries.len()).unwrap(),
        };
        let mut v = req(hdr(CMD_RESOURCE_ATTACH_BACKING), &[b.as_slice()]);
        for e in entries {
            v.extend_from_slice(e.as_slice());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use vm_memory::ByteValued;

    fn ok(bytes: &[u8]) -> Command {
        match decode(bytes) {
            Ok((_, c)) => c,
            Err(e) => panic!("expected a command, got {e:?}"),
        }
    }

    fn err(bytes: &[u8]) -> DecodeError {
        match decode(bytes) {
            Ok((_, c)) => panic!("expected an error, got {c:?}"),
            Err((_, e)) => e,
        }
    }

    fn rid(resource_id: u32) -> ResourceId {
        ResourceId {
            resource_id,
            padding: 0,
        }
    }

    #[test]
    fn header_is_returned_with_the_command() {
        let h = fenced(CMD_GET_DISPLAY_INFO, 4, 99);
        let (got, cmd) = decode(&req(h, &[])).unwrap();
        assert_eq!(got, h);
        assert_eq!(cmd, Command::GetDisplayInfo);
        assert_eq!(cmd.name(), "GET_DISPLAY_INFO");
    }

    #[test]
    fn short_header() {
        assert_eq!(err(&[0u8; 23]), DecodeError::ShortHeader { len: 23 });
        assert_eq!(err(&[]), DecodeError::ShortHeader { len: 0 });
        let (h, e) = decode(&[1u8; 10]).unwrap_err();
        assert!(h.is_none());
        assert_eq!(e.response_code(), RESP_ERR_UNSPEC);
    }

    #[test]
    fn unknown_and_unsupported_types() {
        let e = err(&req(hdr(0x4242), &[]));
        assert_eq!(e, DecodeError::UnknownType(0x4242));
        assert_eq!(e.response_code(), RESP_ERR_UNSPEC);
        // A response type sent as a command is unknown too.
        assert_eq!(
            err(&req(hdr(RESP_OK_NODATA), &[])),
            DecodeError::UnknownType(RESP_OK_NODATA)
        );
        let e = err(&req(hdr(CMD_RESOURCE_CREATE_BLOB), &[&[0u8; 64]]));
        assert_eq!(e, DecodeError::Unsupported(CMD_RESOURCE_CREATE_BLOB));
        assert_eq!(e.response_code(), RESP_ERR_UNSPEC);
        // The header survives so the error can carry the fence.
        let h = fenced(0x4242, 1, 5);
        assert_eq!(decode(&req(h, &[])).unwrap_err().0, Some(h));
    }

    #[test]
    fn every_fixed_command_decodes() {
        let edid = GetEdid {
            scanout: 3,
            padding: 0,
        };
        assert_eq!(
            ok(&req(hdr(CMD_GET_EDID), &[edid.as_slice()])),
            Command::GetEdid { scanout: 3 }
        );
        let ci = GetCapsetInfo {
            capset_index: 1,
            padding: 0,
        };
        assert_eq!(
            ok(&req(hdr(CMD_GET_CAPSET_INFO), &[ci.as_slice()])),
            Command::GetCapsetInfo { index: 1 }
        );
        let gc = GetCapset {
            capset_id: 2,
            capset_version: 1,
        };
        assert_eq!(
            ok(&req(hdr(CMD_GET_CAPSET), &[gc.as_slice()])),
            Command::GetCapset { id: 2, version: 1 }
        );
        let c2 = ResourceCreate2d {
            resource_id: 5,
            format: FORMAT_B8G8R8X8_UNORM,
            width: 1024,
            height: 768,
        };
        assert_eq!(
            ok(&req(hdr(CMD_RESOURCE_CREATE_2D), &[c2.as_slice()])),
            Command::ResourceCreate2d(c2)
        );
        assert_eq!(
            ok(&req(hdr(CMD_RESOURCE_UNREF), &[rid(5).as_slice()])),
            Command::ResourceUnref { resource_id: 5 }
        );
        let r = Rect {
            x: 0,
            y: 0,
            width: 1024,
            height: 768,
        };
        let ss = SetScanout {
            r,
            scanout_id: 0,
            resource_id: 0,
        };
        assert_eq!(
            ok(&req(hdr(CMD_SET_SCANOUT), &[ss.as_slice()])),
            Command::SetScanout(ss)
        );
        let fl = ResourceFlush {
            r,
            resource_id: 5,
            padding: 0,
        };
        assert_eq!(
            ok(&req(hdr(CMD_RESOURCE_FLUSH), &[fl.as_slice()])),
            Command::ResourceFlush(fl)
        );
        let t2 = TransferToHost2d {
            r,
            offset: 64,
            resource_id: 5,
            padding: 0,
        };
        assert_eq!(
            ok(&req(hdr(CMD_TRANSFER_TO_HOST_2D), &[t2.as_slice()])),
            Command::TransferToHost2d(t2)
        );
        assert_eq!(
            ok(&req(hdr(CMD_RESOURCE_DETACH_BACKING), &[rid(5).as_slice()])),
            Command::ResourceDetachBacking { resource_id: 5 }
        );
        assert_eq!(ok(&req(hdr(CMD_CTX_DESTROY), &[])), Command::CtxDestroy);
        assert_eq!(
            ok(&req(hdr(CMD_CTX_ATTACH_RESOURCE), &[rid(6).as_slice()])),
            Command::CtxAttachResource { resource_id: 6 }
        );
        assert_eq!(
            ok(&req(hdr(CMD_CTX_DETACH_RESOURCE), &[rid(6).as_slice()])),
            Command::CtxDetachResource { resource_id: 6 }
        );
        let c3 = ResourceCreate3d {
            resource_id: 6,
            target: 2,
            format: 1,
            bind: 2,
            width: 64,
            height: 64,
            depth: 1,
            array_size: 1,
            ..ResourceCreate3d::default()
        };
        assert_eq!(
            ok(&req(hdr(CMD_RESOURCE_CREATE_3D), &[c3.as_slice()])),
            Command::ResourceCreate3d(c3)
        );
        let t3 = TransferHost3d {
            box_: Box3d {
                w: 64,
                h: 64,
                d: 1,
                ..Box3d::default()
            },
            offset: 0,
            resource_id: 6,
            level: 0,
            stride: 256,
            layer_stride: 0,
        };
        assert_eq!(
            ok(&req(hdr(CMD_TRANSFER_TO_HOST_3D), &[t3.as_slice()])),
            Command::TransferToHost3d(t3)
        );
        assert_eq!(
            ok(&req(hdr(CMD_TRANSFER_FROM_HOST_3D), &[t3.as_slice()])),
            Command::TransferFromHost3d(t3)
        );
        let cur = UpdateCursor {
            pos: CursorPos {
                scanout_id: 0,
                x: 10,
                y: 20,
                padding: 0,
            },
            resource_id: 7,
            hot_x: 1,
            hot_y: 2,
            padding: 0,
        };
        assert_eq!(
            ok(&req(hdr(CMD_UPDATE_CURSOR), &[cur.as_slice()])),
            Command::UpdateCursor(cur)
        );
        assert_eq!(
            ok(&req(hdr(CMD_MOVE_CURSOR), &[cur.as_slice()])),
            Command::MoveCursor(cur)
        );
    }

    #[test]
    fn every_fixed_command_rejects_a_short_body() {
        let cases: &[(u32, usize)] = &[
            (CMD_GET_EDID, 8),
            (CMD_GET_CAPSET_INFO, 8),
            (CMD_GET_CAPSET, 8),
            (CMD_RESOURCE_CREATE_2D, 16),
            (CMD_RESOURCE_UNREF, 8),
            (CMD_SET_SCANOUT, 24),
            (CMD_RESOURCE_FLUSH, 24),
            (CMD_TRANSFER_TO_HOST_2D, 32),
            (CMD_RESOURCE_ATTACH_BACKING, 8),
            (CMD_RESOURCE_DETACH_BACKING, 8),
            (CMD_CTX_CREATE, 72),
            (CMD_CTX_ATTACH_RESOURCE, 8),
            (CMD_CTX_DETACH_RESOURCE, 8),
            (CMD_RESOURCE_CREATE_3D, 48),
            (CMD_TRANSFER_TO_HOST_3D, 48),
            (CMD_TRANSFER_FROM_HOST_3D, 48),
            (CMD_SUBMIT_3D, 8),
            (CMD_UPDATE_CURSOR, 32),
            (CMD_MOVE_CURSOR, 32),
        ];
        for &(ty, need) in cases {
            let body = vec![1u8; need - 1];
            let e = err(&req(hdr(ty), &[&body]));
            assert_eq!(
                e,
                DecodeError::ShortBody {
                    cmd: type_name(ty),
                    need,
                    have: need - 1
                },
                "{}",
                type_name(ty)
            );
            assert_eq!(e.response_code(), RESP_ERR_UNSPEC);
            // One more byte and the short-body error goes away.
            let body = vec![1u8; need];
            assert!(
                !matches!(
                    decode(&req(hdr(ty), &[&body])),
                    Err((_, DecodeError::ShortBody { .. }))
                ),
                "{}",
                type_name(ty)
            );
        }
    }

    #[test]
    fn resource_id_zero_is_rejected_where_it_names_a_resource() {
        for ty in [
            CMD_RESOURCE_UNREF,
            CMD_RESOURCE_DETACH_BACKING,
            CMD_CTX_ATTACH_RESOURCE,
            CMD_CTX_DETACH_RESOURCE,
        ] {
            let e = err(&req(hdr(ty), &[rid(0).as_slice()]));
            assert_eq!(e, DecodeError::ZeroResourceId { cmd: type_name(ty) });
            assert_eq!(e.response_code(), RESP_ERR_INVALID_RESOURCE_ID);
        }
        let c2 = ResourceCreate2d {
            resource_id: 0,
            format: 1,
            width: 1,
            height: 1,
        };
        assert!(matches!(
            err(&req(hdr(CMD_RESOURCE_CREATE_2D), &[c2.as_slice()])),
            DecodeError::ZeroResourceId { .. }
        ));
        assert!(matches!(
            err(&attach(0, &[])),
            DecodeError::ZeroResourceId { .. }
        ));
        // SET_SCANOUT and UPDATE_CURSOR use 0 for "disable".
        let ss = SetScanout::default();
        assert!(decode(&req(hdr(CMD_SET_SCANOUT), &[ss.as_slice()])).is_ok());
        let cur = UpdateCursor::default();
        assert!(decode(&req(hdr(CMD_UPDATE_CURSOR), &[cur.as_slice()])).is_ok());
    }

    #[test]
    fn attach_backing_reads_its_entries() {
        let entries = [
            MemEntry {
                addr: 0x1000,
                length: 4096,
                padding: 0,
            },
            MemEntry {
                addr: 0x8000,
                length: 100,
                padding: 0,
            },
        ];
        assert_eq!(
            ok(&attach(3, &entries)),
            Command::ResourceAttachBacking {
                resource_id: 3,
                entries: entries.to_vec()
            }
        );
        assert_eq!(
            ok(&attach(3, &[])),
            Command::ResourceAttachBacking {
                resource_id: 3,
                entries: vec![]
            }
        );
    }

    #[test]
    fn attach_backing_rejects_lying_and_huge_entry_counts() {
        let entry = MemEntry {
            addr: 0x1000,
            length: 4096,
            padding: 0,
        };
        // Claims 3 entries, carries 2.
        let mut bytes = attach(3, &[entry, entry]);
        bytes[24 + 4] = 3;
        let e = err(&bytes);
        assert_eq!(
            e,
            DecodeError::EntriesTruncated {
                nr: 3,
                need: 8 + 48,
                have: 8 + 32
            }
        );
        assert_eq!(e.response_code(), RESP_ERR_INVALID_PARAMETER);
        // Claims more than the limit: refused before looking for them.
        let b = ResourceAttachBacking {
            resource_id: 3,
            nr_entries: MAX_MEM_ENTRIES + 1,
        };
        let e = err(&req(hdr(CMD_RESOURCE_ATTACH_BACKING), &[b.as_slice()]));
        assert_eq!(
            e,
            DecodeError::TooManyEntries {
                nr: MAX_MEM_ENTRIES + 1
            }
        );
        let b = ResourceAttachBacking {
            resource_id: 3,
            nr_entries: u32::MAX,
        };
        assert!(matches!(
            err(&req(hdr(CMD_RESOURCE_ATTACH_BACKING), &[b.as_slice()])),
            DecodeError::TooManyEntries { .. }
        ));
    }

    #[test]
    fn ctx_create_reads_the_name() {
        let mut b = CtxCreate {
            nlen: 5,
            context_init: 0,
            debug_name: [0; 64],
        };
        b.debug_name[..5].copy_from_slice(b"hello");
        let h = fenced(CMD_CTX_CREATE, 9, 0);
        assert_eq!(
            ok(&req(h, &[b.as_slice()])),
            Command::CtxCreate {
                context_init: 0,
                debug_name: "hello".into()
            }
        );
        b.nlen = 65;
        let e = err(&req(h, &[b.as_slice()]));
        assert_eq!(e, DecodeError::NameTooLong { nlen: 65 });
        assert_eq!(e.response_code(), RESP_ERR_INVALID_PARAMETER);
    }

    #[test]
    fn submit_3d_takes_exactly_size_bytes() {
        let h = fenced(CMD_SUBMIT_3D, 1, 10);
        assert_eq!(
            ok(&submit(h, b"FNCLpayload")),
            Command::Submit3d {
                payload: b"FNCLpayload".to_vec()
            }
        );
        assert_eq!(ok(&submit(h, b"")), Command::Submit3d { payload: vec![] });
        // Trailing bytes beyond `size` are not part of the payload.
        let mut bytes = submit(h, b"abc");
        bytes.extend_from_slice(b"zz");
        assert_eq!(
            ok(&bytes),
            Command::Submit3d {
                payload: b"abc".to_vec()
            }
        );
    }

    #[test]
    fn submit_3d_with_a_lying_size_is_refused() {
        let h = fenced(CMD_SUBMIT_3D, 1, 10);
        let mut bytes = submit(h, b"abcd");
        bytes[24] = 200; // size field
        let (got, e) = decode(&bytes).unwrap_err();
        assert_eq!(e, DecodeError::SubmitSize { size: 200, have: 4 });
        assert_eq!(e.response_code(), RESP_ERR_INVALID_PARAMETER);
        assert_eq!(got, Some(h));
        bytes[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(err(&bytes), DecodeError::SubmitSize { .. }));
    }
}
