// Errors inside the library: thrown as dsv4::Error, turned into a status + message at the C API.
#pragma once

#include "dsv4.h"

#include <cstdarg>
#include <new>
#include <stdexcept>
#include <string>

namespace dsv4 {

class Error : public std::runtime_error {
  public:
    Error(dsv4_status status, const std::string & message) : std::runtime_error(message), status_(status) {}
    dsv4_status status() const { return status_; }

  private:
    dsv4_status status_;
};

// printf-style message formatting.
std::string format(const char * fmt, ...) __attribute__((format(printf, 1, 2)));

[[noreturn]] void fail(dsv4_status status, const char * fmt, ...) __attribute__((format(printf, 2, 3)));

// The thread's last error message (what dsv4_last_error() returns).
void set_last_error(const std::string & message);
const char * last_error();

// Runs `fn` for a C API function: every exception becomes a status and dsv4_last_error().
template <typename F> dsv4_status guarded(F && fn) {
    try {
        fn();
        set_last_error("");
        return DSV4_OK;
    } catch (const Error & e) {
        set_last_error(e.what());
        return e.status();
    } catch (const std::bad_alloc &) {
        set_last_error("out of memory");
        return DSV4_ERR_OUT_OF_MEMORY;
    } catch (const std::exception & e) {
        set_last_error(std::string("internal error: ") + e.what());
        return DSV4_ERR_INTERNAL;
    } catch (...) {
        set_last_error("internal error: unknown exception");
        return DSV4_ERR_INTERNAL;
    }
}

// Throws DSV4_ERR_INVALID_ARGUMENT when a required pointer argument is null.
inline void require(const void * p, const char * what) {
    if (p == nullptr) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "%s must not be NULL", what);
    }
}

}  // namespace dsv4
