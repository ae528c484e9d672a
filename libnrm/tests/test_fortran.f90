! A Fortran program reporting progress and one phase through the bindings.
program test_fortran
  use nrm
  implicit none
  type(nrm_context) :: ctxt
  integer :: i, rc
  integer(8) :: big

  rc = nrm_init(ctxt, "fortran-app")
  if (rc /= 0) stop 1
  do i = 1, 100
    rc = nrm_send_progress(ctxt, 2)
  end do
  big = 5000000000_8
  rc = nrm_send_progress(ctxt, big)
  rc = nrm_send_phase_context(ctxt, 0, 100_8, 400_8, 400_8, 1000_8)
  rc = nrm_fini(ctxt)
  if (rc /= 0) stop 2
  if (nrm_is_active(ctxt)) stop 3
  print '(a)', 'fortran ok'
end program test_fortran
