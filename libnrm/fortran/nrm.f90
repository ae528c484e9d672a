! Fortran bindings of libnrm (ISO_C_BINDING).  Build into libnrmf.so, so
! C programs do not pull in the Fortran runtime; link with -lnrmf -lnrm.
!
! Fortran cannot size the C context structure, so nrm_context wraps a
! pointer to one allocated by the C library; nrm_fini releases it.
module nrm
  use, intrinsic :: iso_c_binding
  implicit none
  private

  type, public :: nrm_context
    type(c_ptr) :: ptr = c_null_ptr
  end type nrm_context

  public :: nrm_init, nrm_fini, nrm_send_progress, nrm_send_phase_context, &
            nrm_send_phase_aggregate, nrm_flush, nrm_is_active

  interface nrm_send_progress
    module procedure nrm_send_progress_i4, nrm_send_progress_i8
  end interface nrm_send_progress

  interface
    function c_ctxt_create() bind(C, name="nrm_ctxt_create") result(p)
      import :: c_ptr
      type(c_ptr) :: p
    end function c_ctxt_create

    subroutine c_ctxt_delete(p) bind(C, name="nrm_ctxt_delete")
      import :: c_ptr
      type(c_ptr), value :: p
    end subroutine c_ctxt_delete

    function c_init(p, name) bind(C, name="nrm_init") result(rc)
      import :: c_ptr, c_int, c_char
      type(c_ptr), value :: p
      character(kind=c_char), dimension(*), intent(in) :: name
      integer(c_int) :: rc
    end function c_init

    function c_fini(p) bind(C, name="nrm_fini") result(rc)
      import :: c_ptr, c_int
      type(c_ptr), value :: p
      integer(c_int) :: rc
    end function c_fini

    function c_flush(p) bind(C, name="nrm_flush") result(rc)
      import :: c_ptr, c_int
      type(c_ptr), value :: p
      integer(c_int) :: rc
    end function c_flush

    function c_is_active(p) bind(C, name="nrm_is_active") result(rc)
      import :: c_ptr, c_int
      type(c_ptr), value :: p
      integer(c_int) :: rc
    end function c_is_active

    function c_progress(p, progress) bind(C, name="nrm_send_progress") result(rc)
      import :: c_ptr, c_int, c_long
      type(c_ptr), value :: p
      integer(c_long), value :: progress
      integer(c_int) :: rc
    end function c_progress

    function c_phase_context(p, cpu, sc, ec, sb, eb) &
        bind(C, name="nrm_send_phase_context") result(rc)
      import :: c_ptr, c_int, c_long_long
      type(c_ptr), value :: p
      integer(c_int), value :: cpu
      integer(c_long_long), value :: sc, ec, sb, eb
      integer(c_int) :: rc
    end function c_phase_context

    function c_phase_aggregate(p, rank, cpu, phase, aggregation, computetime, totaltime) &
        bind(C, name="nrm_send_phase_aggregate") result(rc)
      import :: c_ptr, c_int, c_long, c_long_long
      type(c_ptr), value :: p
      integer(c_int), value :: rank, cpu
      integer(c_long_long), value :: phase
      integer(c_long), value :: aggregation
      integer(c_long_long), value :: computetime, totaltime
      integer(c_int) :: rc
    end function c_phase_aggregate
  end interface

contains

  integer function nrm_init(ctxt, app_name)
    type(nrm_context), intent(inout) :: ctxt
    character(len=*), intent(in) :: app_name
    if (.not. c_associated(ctxt%ptr)) ctxt%ptr = c_ctxt_create()
    if (.not. c_associated(ctxt%ptr)) then
      nrm_init = -1
      return
    end if
    nrm_init = int(c_init(ctxt%ptr, trim(app_name) // c_null_char))
  end function nrm_init

  integer function nrm_fini(ctxt)
    type(nrm_context), intent(inout) :: ctxt
    nrm_fini = 0
    if (.not. c_associated(ctxt%ptr)) return
    nrm_fini = int(c_fini(ctxt%ptr))
    call c_ctxt_delete(ctxt%ptr)
    ctxt%ptr = c_null_ptr
  end function nrm_fini

  integer function nrm_flush(ctxt)
    type(nrm_context), intent(inout) :: ctxt
    nrm_flush = 0
    if (c_associated(ctxt%ptr)) nrm_flush = int(c_flush(ctxt%ptr))
  end function nrm_flush

  logical function nrm_is_active(ctxt)
    type(nrm_context), intent(in) :: ctxt
    nrm_is_active = .false.
    if (c_associated(ctxt%ptr)) nrm_is_active = c_is_active(ctxt%ptr) /= 0
  end function nrm_is_active

  integer function nrm_send_progress_i4(ctxt, progress)
    type(nrm_context), intent(inout) :: ctxt
    integer(4), intent(in) :: progress
    nrm_send_progress_i4 = 0
    if (c_associated(ctxt%ptr)) &
      nrm_send_progress_i4 = int(c_progress(ctxt%ptr, int(progress, c_long)))
  end function nrm_send_progress_i4

  integer function nrm_send_progress_i8(ctxt, progress)
    type(nrm_context), intent(inout) :: ctxt
    integer(8), intent(in) :: progress
    nrm_send_progress_i8 = 0
    if (c_associated(ctxt%ptr)) &
      nrm_send_progress_i8 = int(c_progress(ctxt%ptr, int(progress, c_long)))
  end function nrm_send_progress_i8

  integer function nrm_send_phase_context(ctxt, cpu, start_compute, end_compute, &
                                          start_barrier, end_barrier)
    type(nrm_context), intent(inout) :: ctxt
    integer, intent(in) :: cpu
    integer(8), intent(in) :: start_compute, end_compute, start_barrier, end_barrier
    nrm_send_phase_context = 0
    if (c_associated(ctxt%ptr)) &
      nrm_send_phase_context = int(c_phase_context(ctxt%ptr, int(cpu, c_int), &
        int(start_compute, c_long_long), int(end_compute, c_long_long), &
        int(start_barrier, c_long_long), int(end_barrier, c_long_long)))
  end function nrm_send_phase_context

  integer function nrm_send_phase_aggregate(ctxt, rank, cpu, phase, aggregation, &
                                            computetime, totaltime)
    type(nrm_context), intent(inout) :: ctxt
    integer, intent(in) :: rank, cpu
    integer(8), intent(in) :: phase, aggregation, computetime, totaltime
    nrm_send_phase_aggregate = 0
    if (c_associated(ctxt%ptr)) &
      nrm_send_phase_aggregate = int(c_phase_aggregate(ctxt%ptr, int(rank, c_int), &
        int(cpu, c_int), int(phase, c_long_long), int(aggregation, c_long), &
        int(computetime, c_long_long), int(totaltime, c_long_long)))
  end function nrm_send_phase_aggregate

end module nrm
