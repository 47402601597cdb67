//! virtio-gpu wire format: the structs and constants of the virtio spec
//! (section 5.7) and Linux's `include/uapi/linux/virtio_gpu.h`.
//!
//! `virtio-bindings` has the same structs, but without [`ByteValued`], so they
//! cannot be read from or written to guest memory directly. The layouts here
//! are checked against the bindings in this module's tests.
//!
//! Every field is little-endian on the wire. The structs use native integers,
//! which is correct only on a little-endian host; the build refuses anything
//! else instead of silently byte-swapping wrong.

use vm_memory::ByteValued;

#[cfg(not(target_endian = "little"))]
compile_error!(
    "fencelab-device reads virtio-gpu structs in host byte order and needs a little-endian host"
);

// Device feature bits (virtio spec 5.7.3).
pub const VIRTIO_GPU_F_VIRGL: u32 = 0;
pub const VIRTIO_GPU_F_EDID: u32 = 1;

// Header flags.
pub const VIRTIO_GPU_FLAG_FENCE: u32 = 1 << 0;
pub const VIRTIO_GPU_FLAG_INFO_RING_IDX: u32 = 1 << 1;

/// Scanouts the protocol can address (`VIRTIO_GPU_MAX_SCANOUTS`).
pub const VIRTIO_GPU_MAX_SCANOUTS: usize = 16;

// 2D commands.
pub const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
pub const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
pub const CMD_RESOURCE_UNREF: u32 = 0x0102;
pub const CMD_SET_SCANOUT: u32 = 0x0103;
pub const CMD_RESOURCE_FLUSH: u32 = 0x0104;
pub const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
pub const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
pub const CMD_RESOURCE_DETACH_BACKING: u32 = 0x0107;
pub const CMD_GET_CAPSET_INFO: u32 = 0x0108;
pub const CMD_GET_CAPSET: u32 = 0x0109;
pub const CMD_GET_EDID: u32 = 0x010a;
pub const CMD_RESOURCE_ASSIGN_UUID: u32 = 0x010b;
pub const CMD_RESOURCE_CREATE_BLOB: u32 = 0x010c;
pub const CMD_SET_SCANOUT_BLOB: u32 = 0x010d;

// 3D commands.
pub const CMD_CTX_CREATE: u32 = 0x0200;
pub const CMD_CTX_DESTROY: u32 = 0x0201;
pub const CMD_CTX_ATTACH_RESOURCE: u32 = 0x0202;
pub const CMD_CTX_DETACH_RESOURCE: u32 = 0x0203;
pub const CMD_RESOURCE_CREATE_3D: u32 = 0x0204;
pub const CMD_TRANSFER_TO_HOST_3D: u32 = 0x0205;
pub const CMD_TRANSFER_FROM_HOST_3D: u32 = 0x0206;
pub const CMD_SUBMIT_3D: u32 = 0x0207;
pub const CMD_RESOURCE_MAP_BLOB: u32 = 0x0208;
pub const CMD_RESOURCE_UNMAP_BLOB: u32 = 0x0209;

// Cursor commands.
pub const CMD_UPDATE_CURSOR: u32 = 0x0300;
pub const CMD_MOVE_CURSOR: u32 = 0x0301;

// Success responses.
pub const RESP_OK_NODATA: u32 = 0x1100;
pub const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
pub const RESP_OK_CAPSET_INFO: u32 = 0x1102;
pub const RESP_OK_CAPSET: u32 = 0x1103;
pub const RESP_OK_EDID: u32 = 0x1104;

// Error responses.
pub const RESP_ERR_UNSPEC: u32 = 0x1200;
pub const RESP_ERR_OUT_OF_MEMORY: u32 = 0x1201;
pub const RESP_ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
pub const RESP_ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
pub const RESP_ERR_INVALID_CONTEXT_ID: u32 = 0x1204;
pub const RESP_ERR_INVALID_PARAMETER: u32 = 0x1205;

// 2D formats (enum virtio_gpu_formats).
pub const FORMAT_B8G8R8A8_UNORM: u32 = 1;
pub const FORMAT_B8G8R8X8_UNORM: u32 = 2;
pub const FORMAT_A8R8G8B8_UNORM: u32 = 3;
pub const FORMAT_X8R8G8B8_UNORM: u32 = 4;
pub const FORMAT_R8G8B8A8_UNORM: u32 = 67;
pub const FORMAT_X8B8G8R8_UNORM: u32 = 68;
pub const FORMAT_A8B8G8R8_UNORM: u32 = 121;
pub const FORMAT_R8G8B8X8_UNORM: u32 = 134;

/// The 2D formats the spec defines; all are 4 bytes per pixel.
pub const FORMATS_2D: [u32; 8] = [
    FORMAT_B8G8R8A8_UNORM,
    FORMAT_B8G8R8X8_UNORM,
    FORMAT_A8R8G8B8_UNORM,
    FORMAT_X8R8G8B8_UNORM,
    FORMAT_R8G8B8A8_UNORM,
    FORMAT_X8B8G8R8_UNORM,
    FORMAT_A8B8G8R8_UNORM,
    FORMAT_R8G8B8X8_UNORM,
];

/// Human-readable name of a command or response type, for logs and stats.
pub fn type_name(ty: u32) -> &'static str {
    match ty {
        CMD_GET_DISPLAY_INFO => "GET_DISPLAY_INFO",
        CMD_RESOURCE_CREATE_2D => "RESOURCE_CREATE_2D",
        CMD_RESOURCE_UNREF => "RESOURCE_UNREF",
        CMD_SET_SCANOUT => "SET_SCANOUT",
        CMD_RESOURCE_FLUSH => "RESOURCE_FLUSH",
        CMD_TRANSFER_TO_HOST_2D => "TRANSFER_TO_HOST_2D",
        CMD_RESOURCE_ATTACH_BACKING => "RESOURCE_ATTACH_BACKING",
        CMD_RESOURCE_DETACH_BACKING => "RESOURCE_DETACH_BACKING",
        CMD_GET_CAPSET_INFO => "GET_CAPSET_INFO",
        CMD_GET_CAPSET => "GET_CAPSET",
        CMD_GET_EDID => "GET_EDID",
        CMD_RESOURCE_ASSIGN_UUID => "RESOURCE_ASSIGN_UUID",
        CMD_RESOURCE_CREATE_BLOB => "RESOURCE_CREATE_BLOB",
        CMD_SET_SCANOUT_BLOB => "SET_SCANOUT_BLOB",
        CMD_CTX_CREATE => "CTX_CREATE",
        CMD_CTX_DESTROY => "CTX_DESTROY",
        CMD_CTX_ATTACH_RESOURCE => "CTX_ATTACH_RESOURCE",
        CMD_CTX_DETACH_RESOURCE => "CTX_DETACH_RESOURCE",
        CMD_RESOURCE_CREATE_3D => "RESOURCE_CREATE_3D",
        CMD_TRANSFER_TO_HOST_3D => "TRANSFER_TO_HOST_3D",
        CMD_TRANSFER_FROM_HOST_3D => "TRANSFER_FROM_HOST_3D",
        CMD_SUBMIT_3D => "SUBMIT_3D",
        CMD_RESOURCE_MAP_BLOB => "RESOURCE_MAP_BLOB",
        CMD_RESOURCE_UNMAP_BLOB => "RESOURCE_UNMAP_BLOB",
        CMD_UPDATE_CURSOR => "UPDATE_CURSOR",
        CMD_MOVE_CURSOR => "MOVE_CURSOR",
        RESP_OK_NODATA => "OK_NODATA",
        RESP_OK_DISPLAY_INFO => "OK_DISPLAY_INFO",
        RESP_OK_CAPSET_INFO => "OK_CAPSET_INFO",
        RESP_OK_CAPSET => "OK_CAPSET",
        RESP_OK_EDID => "OK_EDID",
        RESP_ERR_UNSPEC => "ERR_UNSPEC",
        RESP_ERR_OUT_OF_MEMORY => "ERR_OUT_OF_MEMORY",
        RESP_ERR_INVALID_SCANOUT_ID => "ERR_INVALID_SCANOUT_ID",
        RESP_ERR_INVALID_RESOURCE_ID => "ERR_INVALID_RESOURCE_ID",
        RESP_ERR_INVALID_CONTEXT_ID => "ERR_INVALID_CONTEXT_ID",
        RESP_ERR_INVALID_PARAMETER => "ERR_INVALID_PARAMETER",
        _ => "UNKNOWN",
    }
}

/// `struct virtio_gpu_ctrl_hdr`: starts every request and every response.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CtrlHdr {
    pub type_: u32,
    pub flags: u32,
    pub fence_id: u64,
    pub ctx_id: u32,
    pub ring_idx: u8,
    pub padding: [u8; 3],
}

impl CtrlHdr {
    /// True when the driver asked for a fence on this command.
    pub fn is_fenced(&self) -> bool {
        self.flags & VIRTIO_GPU_FLAG_FENCE != 0
    }

    /// The header of the response to the request `self`, with type `ty`.
    ///
    /// A fenced request's response carries the same fence flag, fence id,
    /// context and ring index: that is how the driver knows which fence it
    /// completes. An unfenced one gets a plain header.
    pub fn response(&self, ty: u32) -> CtrlHdr {
        if self.is_fenced() {
            CtrlHdr {
                type_: ty,
                flags: self.flags & (VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX),
                fence_id: self.fence_id,
                ctx_id: self.ctx_id,
                ring_idx: self.ring_idx,
                padding: [0; 3],
            }
        } else {
            CtrlHdr {
                type_: ty,
                ..CtrlHdr::default()
            }
        }
    }
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResourceCreate2d {
    pub resource_id: u32,
    pub format: u32,
    pub width: u32,
    pub height: u32,
}

/// Body shared by every command that names one resource and pads to 8 bytes
/// (`RESOURCE_UNREF`, `RESOURCE_DETACH_BACKING`, `CTX_{ATTACH,DETACH}_RESOURCE`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResourceId {
    pub resource_id: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SetScanout {
    pub r: Rect,
    pub scanout_id: u32,
    pub resource_id: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResourceFlush {
    pub r: Rect,
    pub resource_id: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TransferToHost2d {
    pub r: Rect,
    pub offset: u64,
    pub resource_id: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResourceAttachBacking {
    pub resource_id: u32,
    pub nr_entries: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemEntry {
    pub addr: u64,
    pub length: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DisplayOne {
    pub r: Rect,
    pub enabled: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RespDisplayInfo {
    pub hdr: CtrlHdr,
    pub pmodes: [DisplayOne; VIRTIO_GPU_MAX_SCANOUTS],
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GetCapsetInfo {
    pub capset_index: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RespCapsetInfo {
    pub hdr: CtrlHdr,
    pub capset_id: u32,
    pub capset_max_version: u32,
    pub capset_max_size: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GetCapset {
    pub capset_id: u32,
    pub capset_version: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GetEdid {
    pub scanout: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RespEdid {
    pub hdr: CtrlHdr,
    pub size: u32,
    pub padding: u32,
    pub edid: [u8; 1024],
}

impl Default for RespEdid {
    fn default() -> Self {
        RespEdid {
            hdr: CtrlHdr::default(),
            size: 0,
            padding: 0,
            edid: [0; 1024],
        }
    }
}

/// `struct virtio_gpu_box`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Box3d {
    pub x: u32,
    pub y: u32,
    pub z: u32,
    pub w: u32,
    pub h: u32,
    pub d: u32,
}

/// `struct virtio_gpu_transfer_host_3d`, used by both 3D transfer directions.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TransferHost3d {
    pub box_: Box3d,
    pub offset: u64,
    pub resource_id: u32,
    pub level: u32,
    pub stride: u32,
    pub layer_stride: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResourceCreate3d {
    pub resource_id: u32,
    pub target: u32,
    pub format: u32,
    pub bind: u32,
    pub width: u32,
    pub height: u32,
    pub depth: u32,
    pub array_size: u32,
    pub last_level: u32,
    pub nr_samples: u32,
    pub flags: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtxCreate {
    pub nlen: u32,
    pub context_init: u32,
    pub debug_name: [u8; 64],
}

impl Default for CtxCreate {
    fn default() -> Self {
        CtxCreate {
            nlen: 0,
            context_init: 0,
            debug_name: [0; 64],
        }
    }
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CmdSubmit {
    pub size: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CursorPos {
    pub scanout_id: u32,
    pub x: u32,
    pub y: u32,
    pub padding: u32,
}

/// Body of both cursor commands (`UPDATE_CURSOR` and `MOVE_CURSOR`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UpdateCursor {
    pub pos: CursorPos,
    pub resource_id: u32,
    pub hot_x: u32,
    pub hot_y: u32,
    pub padding: u32,
}

/// `struct virtio_gpu_config`, the device config space.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GpuConfig {
    pub events_read: u32,
    pub events_clear: u32,
    pub num_scanouts: u32,
    pub num_capsets: u32,
}

// SAFETY: every type below is `repr(C)`, made only of integers and integer
// arrays whose sizes leave no implicit padding (checked by the size tests
// against the kernel's layouts), so any byte pattern is a valid value.
unsafe impl ByteValued for CtrlHdr {}
// SAFETY: see above.
unsafe impl ByteValued for Rect {}
// SAFETY: see above.
unsafe impl ByteValued for ResourceCreate2d {}
// SAFETY: see above.
unsafe impl ByteValued for ResourceId {}
// SAFETY: see above.
unsafe impl ByteValued for SetScanout {}
// SAFETY: see above.
unsafe impl ByteValued for ResourceFlush {}
// SAFETY: see above.
unsafe impl ByteValued for TransferToHost2d {}
// SAFETY: see above.
unsafe impl ByteValued for ResourceAttachBacking {}
// SAFETY: see above.
unsafe impl ByteValued for MemEntry {}
// SAFETY: see above.
unsafe impl ByteValued for DisplayOne {}
// SAFETY: see above.
unsafe impl ByteValued for RespDisplayInfo {}
// SAFETY: see above.
unsafe impl ByteValued for GetCapsetInfo {}
// SAFETY: see above.
unsafe impl ByteValued for RespCapsetInfo {}
// SAFETY: see above.
unsafe impl ByteValued for GetCapset {}
// SAFETY: see above.
unsafe impl ByteValued for GetEdid {}
// SAFETY: see above.
unsafe impl ByteValued for RespEdid {}
// SAFETY: see above.
unsafe impl ByteValued for Box3d {}
// SAFETY: see above.
unsafe impl ByteValued for TransferHost3d {}
// SAFETY: see above.
unsafe impl ByteValued for ResourceCreate3d {}
// SAFETY: see above.
unsafe impl ByteValued for CtxCreate {}
// SAFETY: see above.
unsafe impl ByteValued for CmdSubmit {}
// SAFETY: see above.
unsafe impl ByteValued for CursorPos {}
// SAFETY: see above.
unsafe impl ByteValued for UpdateCursor {}
// SAFETY: see above.
unsafe impl ByteValued for GpuConfig {}

/// Reads a `T` from the start of `bytes`, or `None` when `bytes` is too short.
/// Unaligned input is fine: the value is copied out.
pub fn read_struct<T: ByteValued + Default>(bytes: &[u8]) -> Option<T> {
    let src = bytes.get(..std::mem::size_of::<T>())?;
    let mut val = T::default();
    val.as_mut_slice().copy_from_slice(src);
    Some(val)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;
    use virtio_bindings::virtio_gpu as vb;

    #[test]
    fn layouts_match_the_kernel_header() {
        assert_eq!(size_of::<CtrlHdr>(), size_of::<vb::virtio_gpu_ctrl_hdr>());
        assert_eq!(size_of::<CtrlHdr>(), 24);
        assert_eq!(size_of::<Rect>(), size_of::<vb::virtio_gpu_rect>());
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<ResourceCreate2d>(),
            size_of::<vb::virtio_gpu_resource_create_2d>()
        );
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<ResourceId>(),
            size_of::<vb::virtio_gpu_resource_unref>()
        );
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<SetScanout>(),
            size_of::<vb::virtio_gpu_set_scanout>()
        );
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<ResourceFlush>(),
            size_of::<vb::virtio_gpu_resource_flush>()
        );
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<TransferToHost2d>(),
            size_of::<vb::virtio_gpu_transfer_to_host_2d>()
        );
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<ResourceAttachBacking>(),
            size_of::<vb::virtio_gpu_resource_attach_backing>()
        );
        assert_eq!(size_of::<MemEntry>(), size_of::<vb::virtio_gpu_mem_entry>());
        assert_eq!(
            size_of::<RespDisplayInfo>(),
            size_of::<vb::virtio_gpu_resp_display_info>()
        );
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<GetCapsetInfo>(),
            size_of::<vb::virtio_gpu_get_capset_info>()
        );
        assert_eq!(
            size_of::<RespCapsetInfo>(),
            size_of::<vb::virtio_gpu_resp_capset_info>()
        );
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<GetCapset>(),
            size_of::<vb::virtio_gpu_get_capset>()
        );
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<GetEdid>(),
            size_of::<vb::virtio_gpu_cmd_get_edid>()
        );
        assert_eq!(size_of::<RespEdid>(), size_of::<vb::virtio_gpu_resp_edid>());
        assert_eq!(size_of::<Box3d>(), size_of::<vb::virtio_gpu_box>());
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<TransferHost3d>(),
            size_of::<vb::virtio_gpu_transfer_host_3d>()
        );
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<ResourceCreate3d>(),
            size_of::<vb::virtio_gpu_resource_create_3d>()
        );
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<CtxCreate>(),
            size_of::<vb::virtio_gpu_ctx_create>()
        );
        assert_eq!(
            size_of::<CtrlHdr>(),
            size_of::<vb::virtio_gpu_ctx_destroy>()
        );
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<ResourceId>(),
            size_of::<vb::virtio_gpu_ctx_resource>()
        );
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<CmdSubmit>(),
            size_of::<vb::virtio_gpu_cmd_submit>()
        );
        assert_eq!(
            size_of::<CtrlHdr>() + size_of::<UpdateCursor>(),
            size_of::<vb::virtio_gpu_update_cursor>()
        );
        assert_eq!(size_of::<GpuConfig>(), size_of::<vb::virtio_gpu_config>());
    }

    #[test]
    fn constants_match_the_kernel_header() {
        assert_eq!(
            CMD_SUBMIT_3D,
            vb::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_SUBMIT_3D
        );
        assert_eq!(
            CMD_MOVE_CURSOR,
            vb::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_MOVE_CURSOR
        );
        assert_eq!(
            RESP_ERR_INVALID_PARAMETER,
            vb::virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER
        );
        assert_eq!(VIRTIO_GPU_FLAG_FENCE, vb::VIRTIO_GPU_FLAG_FENCE);
        assert_eq!(VIRTIO_GPU_F_EDID, vb::VIRTIO_GPU_F_EDID);
    }

    #[test]
    fn fenced_response_echoes_the_fence() {
        let req = CtrlHdr {
            type_: CMD_SUBMIT_3D,
            flags: VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX,
            fence_id: 77,
            ctx_id: 3,
            ring_idx: 2,
            padding: [9; 3],
        };
        let resp = req.response(RESP_OK_NODATA);
        assert_eq!(resp.type_, RESP_OK_NODATA);
        assert_eq!(resp.flags, req.flags);
        assert_eq!((resp.fence_id, resp.ctx_id, resp.ring_idx), (77, 3, 2));
        assert_eq!(resp.padding, [0; 3]);

        let plain = CtrlHdr {
            type_: CMD_GET_DISPLAY_INFO,
            fence_id: 5,
            ..CtrlHdr::default()
        };
        assert_eq!(
            plain.response(RESP_OK_DISPLAY_INFO),
            CtrlHdr {
                type_: RESP_OK_DISPLAY_INFO,
                ..CtrlHdr::default()
            }
        );
    }

    #[test]
    fn read_struct_refuses_short_input() {
        assert!(read_struct::<CtrlHdr>(&[0u8; 23]).is_none());
        let mut bytes = [0u8; 25];
        bytes[0] = 0x07;
        bytes[1] = 0x02;
        assert_eq!(
            read_struct::<CtrlHdr>(&bytes).map(|h| h.type_),
            Some(0x0207)
        );
    }
}
